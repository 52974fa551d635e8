"""Mode 6, ``peer``: mlx-vlm's ``batch_generate`` on the bench's model and rows.

The issue names mlx-vlm's batch generation as the peer to beat. With ``--peer`` the bench runs it
after the five modes, in the same process (OpenBLAS loaded for it as for the rest), on the same
model folder, images and prompts, greedy, with the same ``max_tokens`` and batch size. mlx-vlm is
not a dependency of jobrunner: ``pip install mlx-vlm`` (the ``bench`` extra pins the version this
was written against).

What the harness adapts, none of which changes what mlx-vlm computes:

- mlx-vlm's Phi-3-V vision module is hard-wired to CLIP ViT-L/14-336 (1024 wide, 24 layers).
  For the presets' smaller towers its CLIP dimensions and widths are set from the checkpoint's
  ``img_processor.vision_config`` while it loads. Its processor assumes 336-pixel crops of 144
  slots, so a preset with other crops (``tiny``) is refused.
- Its Phi-3-V processor hands all of a call's images to every prompt, so a call with two rows
  over images of one size raises (0.7.10: "Number of image tags (1) doesn't match number of
  images (2)"). Such a call is run again one row per call; the failed attempt's time is left
  out and the report gives the error.
- ``batch_generate`` takes images for all of a call's prompts or for none, so rows without an
  image go in calls of their own, ``batch_size`` at a time; rows with one, ``batch_size`` at a
  time in input order (it groups them by image size itself).

Reported besides the rates: whether rows given to it in one call with others (it batches rows
without an image, and splits a call's image rows into groups of one size) give the text each
gives alone (its exactness), and how many rows give the same text as a jobrunner mode. Texts are
compared without U+FFFD: mlx-vlm's streaming detokenizer drops the replacement characters of
incomplete byte sequences that ``decode`` keeps. Prompt and generated token counts are mlx-vlm's
own; padding is counted on jobrunner's tokenization of the same calls; peak memory includes
jobrunner's model, which stays loaded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..batching import PlanStats
from .modes import ModeResult
from .workload import load_rows

PACKAGE = "mlx-vlm"
_CLIP_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "image_size",
    "patch_size",
    "num_channels",
    "layer_norm_eps",
)
EXACTNESS_ROWS = 8  # rows given in one call with others, run again alone


class PeerUnavailable(Exception):
    """The peer cannot run here (not installed, or the model's crops are not its crops)."""


def peer_version() -> str | None:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def check_peer(config: dict[str, Any]) -> str:
    """The installed mlx-vlm version; raises ``PeerUnavailable`` saying why it cannot run."""
    version = peer_version()
    if version is None:
        raise PeerUnavailable(f"--peer needs {PACKAGE}: pip install '{PACKAGE}' (or '.[bench]')")
    clip = config.get("img_processor", {})
    vision = clip.get("vision_config", {})
    crop, patch = vision.get("image_size", 336), vision.get("patch_size", 14)
    if (crop, patch, clip.get("num_img_tokens", 144)) != (336, 14, 144):
        raise PeerUnavailable(
            f"{PACKAGE}'s Phi-3-V processor assumes 336-pixel crops of 144 slots; this model "
            f"has {crop}-pixel crops (patch {patch}): use --preset small or phi3v"
        )
    return version


@contextmanager
def _vision_dims(config: dict[str, Any]) -> Iterator[None]:
    """mlx-vlm's Phi-3-V vision module, built with the checkpoint's CLIP dimensions."""
    from mlx_vlm.models.phi3_v import vision

    cls = vision.VisionModel
    saved_clip, saved_init = cls.CLIP_VIT_LARGE_PATCH14_336_CONFIG, cls.__init__
    ours = config.get("img_processor", {}).get("vision_config", {})
    clip = SimpleNamespace(
        **{**vars(saved_clip), **{k: ours[k] for k in _CLIP_FIELDS if k in ours}}
    )
    width = clip.hidden_size

    def init(self, model_config):
        saved_init(self, model_config)
        hidden = model_config.hidden_size
        self.image_dim_out = width
        self.glb_GN = mx.zeros((1, 1, 4 * width))
        self.sub_GN = mx.zeros((1, 1, 1, 4 * width))
        self.img_projection = [nn.Linear(4 * width, hidden), nn.GELU(), nn.Linear(hidden, hidden)]

    cls.CLIP_VIT_LARGE_PATCH14_336_CONFIG, cls.__init__ = clip, init
    try:
        yield
    finally:
        cls.CLIP_VIT_LARGE_PATCH14_336_CONFIG, cls.__init__ = saved_clip, saved_init


def comparable(text: str) -> str:
    return text.replace("\ufffd", "")


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[k : k + size] for k in range(0, len(indices), size)]


def run_peer(
    model_dir: Path,
    jsonl: Path,
    lengths: list[int],
    max_tokens: int,
    batch_size: int,
    log: Callable[[str], None],
) -> tuple[ModeResult, dict[int, str]]:
    """Mode 6 on the rows of ``jsonl`` (``lengths``: jobrunner's prompt lengths, for padding).

    Returns:
        The result and each row's text, by row number.
    """
    config = json.loads((model_dir / "config.json").read_text())
    version = check_peer(config)
    from mlx_vlm import load as load_peer
    from mlx_vlm.generate import batch_generate
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its config classes warn about Phi-3's su rope keys
    try:
        with _vision_dims(config):
            model, processor = load_peer(str(model_dir))
    finally:
        hf_logging.set_verbosity(verbosity)
    records = load_rows(jsonl)

    def call(rows: list[int], tokens: int):
        images = [str(jsonl.parent / records[i]["image"]) for i in rows if records[i].get("image")]
        prompts = [records[i]["prompt"] for i in rows]
        return batch_generate(
            model, processor, images=images or None, prompts=prompts, max_tokens=tokens
        )

    with_image = [i for i, r in enumerate(records) if r.get("image")]
    text_only = [i for i, r in enumerate(records) if not r.get("image")]
    for rows in (with_image[:1], text_only[:1]):  # untimed warm-up
        if rows:
            call(rows, 2)
    calls = _chunks(text_only, batch_size) + _chunks(with_image, batch_size)
    texts: dict[int, str] = {}
    together: list[int] = []
    stats, padding, failed, errors = [0, 0], PlanStats(), 0.0, []
    mx.reset_peak_memory()
    start = time.perf_counter()
    for rows in calls:
        attempt = time.perf_counter()
        try:
            runs = [(rows, call(rows, max_tokens))]
            together += rows if len(rows) > 1 else []
        except ValueError as err:  # a call it cannot batch: run its rows one by one
            failed += time.perf_counter() - attempt
            errors.append(str(err))
            runs = [([i], call([i], max_tokens)) for i in rows]
        for run_rows, response in runs:
            texts.update(zip(run_rows, response.texts, strict=True))
            stats[0] += response.stats.prompt_tokens
            stats[1] += response.stats.generation_tokens
            padding.add([lengths[i] for i in run_rows])
    seconds = time.perf_counter() - start - failed
    peak = int(mx.get_peak_memory())
    log(f"  {PACKAGE} {version}: {len(errors)} of {len(calls)} calls could not batch their rows")
    checked = together[:EXACTNESS_ROWS]
    alone = {i: call([i], max_tokens).texts[0] for i in checked}
    result = ModeResult(
        mode="peer",
        rows=len(records),
        seconds=seconds,
        prompt_tokens=stats[0],
        generated_tokens=stats[1],
        padding_fraction=padding.padding_fraction,
        peak_memory_bytes=peak,
        batches=padding.batches,
        extra={
            "peer": f"{PACKAGE} {version}",
            "calls": len(calls),
            "calls_that_could_not_batch": len(errors),
            "first_error": errors[0] if errors else None,
            "failed_call_seconds": failed,
            "rows_in_shared_calls": len(together),
            "rows_checked_alone": len(checked),
            "rows_same_as_alone": sum(
                comparable(texts[i]) == comparable(alone[i]) for i in checked
            ),
        },
    )
    return result, texts


def agreement(texts: dict[int, str], reference: dict[int, str], records: list[dict]) -> dict:
    """Rows (with an image and without) whose peer text equals ``reference``'s, U+FFFD aside."""
    out = {}
    for kind, has_image in (("rows_with_image", True), ("rows_without_image", False)):
        rows = [i for i in texts if i in reference and bool(records[i].get("image")) == has_image]
        same = sum(comparable(texts[i]) == comparable(reference[i]) for i in rows)
        out[kind] = {"compared": len(rows), "same": same}
    return out
