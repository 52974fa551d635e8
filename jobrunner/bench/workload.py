"""The bench's workload: model presets, a random-weight model whose greedy outputs never stop
early, and a synthetic dataset (PNG images of mixed sizes shared by prompts of mixed lengths).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from model.loading import DTYPES
from model.tiny import _init_std, save_model, tiny_config, weight_shapes


@dataclass(frozen=True)
class Preset:
    """Model dimensions (``tiny_config`` overrides) and workload of one bench size."""

    config: dict[str, Any]
    rows: int
    max_tokens: int
    batch_size: int
    naive_rows: int
    single_rows: int
    num_crops: int = 4


_REAL_CLIP = {"image_size": 336, "patch_size": 14}
PRESETS: dict[str, Preset] = {
    # Seconds: the test suite's size. 56-pixel crops, 3x3 cells per crop.
    "tiny": Preset({}, rows=8, max_tokens=8, batch_size=4, naive_rows=2, single_rows=8),
    # Minutes on a 2-core CPU: real crop size and 144 slots per crop, a real-size vocabulary.
    "small": Preset(
        {
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "vocab_size": 32064,
            "vision_config": {
                "hidden_size": 256,
                "intermediate_size": 1024,
                "num_attention_heads": 4,
                "num_hidden_layers": 4,
                **_REAL_CLIP,
            },
        },
        rows=40,
        max_tokens=64,
        batch_size=16,  # jobrunner run's default
        naive_rows=1,
        single_rows=8,
    ),
    # Phi-3.5-vision-instruct dimensions (4.2B parameters): for an accelerator with the memory.
    "phi3v": Preset(
        {
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "vocab_size": 32064,
            "original_max_position_embeddings": 4096,
            "vision_config": {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 24,
                **_REAL_CLIP,
            },
        },
        rows=64,
        max_tokens=64,
        batch_size=32,
        naive_rows=2,
        single_rows=8,
    ),
}


def build_model_dir(out_dir: Path, preset: Preset, dtype: str, seed: int = 0) -> Path:
    """A random-weight model in Hugging Face layout whose greedy outputs never stop early."""
    config = tiny_config(**preset.config)
    marker = {"config": config, "dtype": dtype, "seed": seed, "num_crops": preset.num_crops}
    marker["tokenizer"] = "chat template"  # a kept --workdir from before the template: rebuilt
    if (out_dir / "bench.json").is_file():  # a kept --workdir: reuse the same model
        if json.loads((out_dir / "bench.json").read_text()) == marker:
            return out_dir
    # save_model writes config, tokenizer and processor files; the weights are drawn with MLX
    # below (fast enough for 4B parameters) and replace its empty safetensors file.
    save_model(out_dir, config, {}, num_crops=preset.num_crops)
    known = _tokenizer_size(out_dir)
    weights = {}
    for k, (name, shape) in enumerate(weight_shapes(config).items()):
        mean, std = _init_std(name, shape)
        value = mean + std * mx.random.normal(shape, key=mx.random.key(seed * 7919 + k))
        if name == "lm_head.weight":  # no special tokens, no ids the tokenizer cannot decode
            vocab = mx.arange(shape[0])[:, None]
            value = mx.where((vocab >= _SPECIAL) & (vocab < known), value, 0.0)
        weights[name] = value.astype(DTYPES[dtype])
        mx.eval(weights[name])
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    (out_dir / "bench.json").write_text(json.dumps(marker))
    return out_dir


_SPECIAL = 10  # model.tiny.SPECIAL_TOKENS take ids 0-9


def _tokenizer_size(model_dir: Path) -> int:
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    ids = list(tokenizer["model"]["vocab"].values()) + [t["id"] for t in tokenizer["added_tokens"]]
    return max(ids) + 1


# (width, height): 4:3 and 3:4 photos, 16:9, square, 2:1, 3:1, 4:1 panoramas, small images.
IMAGE_SIZES = [
    (640, 480),
    (480, 640),
    (1280, 720),
    (512, 512),
    (800, 400),
    (1024, 768),
    (900, 300),
    (300, 200),
    (400, 800),
    (1200, 300),
    (720, 1280),
    (160, 120),
]
_WORDS = (
    "describe the image in detail what colour is the circle square triangle on left right top "
    "bottom small large red green blue yellow picture shows a photo of cat dog man bicycle street "
    "how many shapes are there write caption for this chart with numbers labels and title"
).split()


def make_dataset(out_dir: Path, rows: int, seed: int = 0, max_tokens: int | None = None) -> Path:
    """``rows`` JSONL rows, most over PNG images shared by 1-3 prompts; returns the JSONL path.

    Images cycle through ``IMAGE_SIZES``; prompts have 3 to 120 words; one row in
    ``TEXT_ONLY_EVERY`` has no image. Rows are shuffled, so rows that share an image are
    usually not neighbours. With ``max_tokens``, each row also has a ``max_tokens`` field drawn
    uniformly from 1 to it (from a generator of its own: the rows are otherwise the same).
    """
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, image = [], 0
    while len(records) < rows:
        width, height = IMAGE_SIZES[image % len(IMAGE_SIZES)]
        name = f"img{image:04d}.png"
        _picture(width, height, rng).save(out_dir / name)
        for _ in range(int(rng.integers(1, 4))):
            records.append({"image": name, "prompt": _prompt(rng)})
            if len(records) % TEXT_ONLY_EVERY == 0:
                records.append({"prompt": _prompt(rng)})  # no image key: a text-only row
        image += 1
    records = [records[i] for i in rng.permutation(len(records))[:rows]]
    if max_tokens is not None:
        limits = np.random.default_rng([seed, 1]).integers(1, max_tokens + 1, size=len(records))
        records = [
            record | {"max_tokens": int(k)} for record, k in zip(records, limits, strict=True)
        ]
    path = out_dir / "bench.jsonl"
    with open(path, "w") as f:
        for i, record in enumerate(records):
            f.write(json.dumps({"id": f"row-{i:05d}", **record}) + "\n")
    return path


TEXT_ONLY_EVERY = 6


def _prompt(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 121)))).capitalize() + "."


def _picture(width: int, height: int, rng: np.random.Generator):
    """A smooth colour gradient with noise (compresses well, differs per image)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    pixels = np.stack([base[c] + 80 * np.sin((x + (c + 1) * y) / (37 + 11 * c)) for c in range(3)])
    pixels = pixels.transpose(1, 2, 0) + rng.normal(0, 8, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def load_rows(jsonl: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
