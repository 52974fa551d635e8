"""Train the bundled demo model: a tiny Phi-3-Vision that captions synthetic shape scenes.

    python -m model.train_demo --out model/demo

The model has the exact Phi-3-V architecture (CLIP tower, HD transform with separators, MLP
projector, su-rope decoder) with small dimensions, trained from scratch with MLX on scenes from
``model.scenes``, in two stages:

1. **Vision.** The CLIP tower learns to see shapes: a linear probe on every merged feature cell
   predicts the kind and colour of the shape under it (labels from ``scenes.mask_image`` taken
   through the same HD transform). A ViT this small learns shape kinds very slowly from captions
   alone; the dense labels make it quick. The probe is thrown away.
2. **Captions and answers.** The whole model learns next-token cross-entropy on the answer tokens
   and the closing ``<|end|>``, with the probe loss kept on. Inputs are built exactly as
   generation builds them: the Processor's chat template and HD transform, left-padded rows,
   per-row position ids and the padding mask, image features in slot order.

Scenes are drawn and preprocessed by a worker process while MLX trains. Seeds are fixed (model
init, every batch's scenes, held-out scenes), so a run gives the same checkpoint on the same
machine. The checkpoint is written in the Hugging Face layout through ``model.tiny.save_model``
and loads through ``model.loading.load`` like a real model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_SEED = 1
HELD_OUT_SEED = 2
SAMPLES_SEED = 3
NUM_CROPS = 4
MIN_COVER = 0.15  # a feature cell is labelled with a shape covering at least this much of it


@dataclass(frozen=True)
class TrainSettings:
    vision_steps: int = 800
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    probe_weight: float = 0.5
    init_seed: int = 0
    scene_seed: int = TRAIN_SEED
    log_every: int = 50


def demo_config(vocab_size: int = 512) -> dict[str, Any]:
    """The demo model's config.json: widths are multiples of 64, so ``quantize=8`` applies."""
    from model.tiny import tiny_config

    return tiny_config(
        _name_or_path="jobrunner/demo-shapes-phi3-v",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=vocab_size,
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=3,
            image_size=84,
            patch_size=14,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Examples (built in the worker process; numpy and PIL only)


@dataclass
class Example:
    row: Any  # PreparedRow: prompt ids + answer ids + <|end|>, and the image
    prompt_length: int
    labels: np.ndarray  # int32 [crops, t*t, 3]: per feature cell, see cell_labels


def answer_ids(processor: Any, answer: str) -> list[int]:
    """Token ids the model should generate for ``answer``: no BOS, closed by ``<|end|>``."""
    ids = processor.tokenizer(answer)["input_ids"][1:]
    return ids + [processor.tokenizer.convert_tokens_to_ids("<|end|>")]


def cell_labels(scene: Any, processor: Any) -> np.ndarray:
    """Labels of every feature cell of every crop of the scene's image: int32 [crops, t*t, 3].

    For the shape covering the cell (0 where none): 1 + its kind, 1 + its colour, and on the
    global view only, 1 + its place in the caption (-1 on tiles, which cannot see the order).
    """
    from model.scenes import COLOURS, SHAPES, mask_image

    crops = processor.transform(mask_image(scene)).crops  # same resize, pad and crop
    ink = 1.0 - (crops * np.float32(processor.image_std) + np.float32(processor.image_mean))
    n, size = crops.shape[:2]
    t = processor.tokens_per_side
    cover = ink.reshape(n, t, size // t, t, size // t, 3).mean(axis=(2, 4)).reshape(n, t * t, 3)
    cover = cover[..., : len(scene.shapes)]
    best = cover.argmax(axis=-1)
    present = cover.max(axis=-1) >= MIN_COVER
    kinds = np.array([SHAPES.index(s.kind) + 1 for s in scene.shapes])[best] * present
    colours = np.array([list(COLOURS).index(s.colour) + 1 for s in scene.shapes])[best] * present
    order = (best + 1) * present
    order[1:] = -1
    return np.stack([kinds, colours, order], axis=-1).astype(np.int32)


def make_example(processor: Any, scene: Any, prompt: str, answer: str) -> Example:
    from model.processing import PreparedRow

    row = processor.prepare(prompt, scene.image)
    ids = row.input_ids + answer_ids(processor, answer)
    return Example(PreparedRow(ids, row.images), len(row.input_ids), cell_labels(scene, processor))


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, config: dict[str, Any], seed: int, batch_size: int) -> None:
    from model.config import ModelConfig
    from model.processing import Processor

    model_config = ModelConfig.from_dict(config)
    processor = Processor.from_pretrained(tokenizer_dir, model_config, num_crops=NUM_CROPS)
    _WORKER.update(processor=processor, seed=seed, batch_size=batch_size)


def _worker_batch(step: int) -> list[Example]:
    """The examples of training step ``step``: a function of (seed, step) alone."""
    from model.scenes import make_scene, sample_task

    rng = np.random.default_rng([_WORKER["seed"], step])
    examples = []
    for _ in range(_WORKER["batch_size"]):
        scene = make_scene(rng)
        examples.append(make_example(_WORKER["processor"], scene, *sample_task(scene, rng)))
    return examples


def prefetch(
    pool: Any, fn: Callable[[int], Any], steps: Iterable[int], depth: int = 4
) -> Iterator[Any]:
    """``fn(step)`` for each step, computed in ``pool`` at most ``depth`` steps ahead, in order."""
    pending: deque = deque()
    for step in steps:
        pending.append(pool.apply_async(fn, (step,)))
        if len(pending) > depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# Batches and losses (MLX)


@dataclass
class Batch:
    """Left-padded prompt + answer ids, loss targets and the cell labels of all crops."""

    rows: list[Any]
    ids: Any  # mx.array int32 [B, L]
    pad: Any  # mx.array int32 [B]
    targets: Any  # mx.array int32 [B, L]: the next token at every position
    weights: Any  # mx.array float32 [B, L]: 1 where the next token is part of the answer
    labels: Any  # mx.array int32 [crops, t*t, 3]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Batch examples the way ``generate_batch`` batches prompts (left padding)."""
    import mlx.core as mx

    from model.generate import _left_pad

    rows = [e.row for e in examples]
    ids, pad = _left_pad(rows, pad_id)
    ids_np = np.array(ids)
    targets = np.zeros_like(ids_np)
    targets[:, :-1] = ids_np[:, 1:]
    weights = np.zeros(ids_np.shape, dtype=np.float32)
    for b, example in enumerate(examples):
        start = ids_np.shape[1] - len(example.row.input_ids) + example.prompt_length
        weights[b, start - 1 : -1] = 1.0  # positions predicting the answer and <|end|>
    return Batch(
        rows,
        ids,
        pad,
        mx.array(np.maximum(targets, 0)),
        mx.array(weights),
        mx.array(np.concatenate([e.labels for e in examples])),
    )


def _crops(rows: Sequence[Any]) -> Any:
    import mlx.core as mx

    return mx.array(np.concatenate([image.crops for row in rows for image in row.images]))


def _slot_features(model: Any, rows: Sequence[Any], merged: Any) -> Any:
    """Projected features in slot order, as ``generate.image_features`` lays them out."""
    import mlx.core as mx

    from model.processing import image_feature_index

    side = model.vision.vision_config.tokens_per_side
    index, offset = [], 0
    for image in (image for row in rows for image in row.images):
        index.append(image_feature_index(image.h_crop, image.w_crop, offset, side))
        offset += image.crops.shape[0]
    return model.vision.project(merged, mx.array(np.concatenate(index)))


def make_probe(cell_dim: int) -> Any:
    """Linear heads on merged feature cells: shape kind, colour and place in the caption."""
    import mlx.nn as nn

    from model.scenes import COLOURS, SHAPES

    probe = nn.Module()
    probe.kind = nn.Linear(cell_dim, len(SHAPES) + 1)
    probe.colour = nn.Linear(cell_dim, len(COLOURS) + 1)
    probe.order = nn.Linear(cell_dim, 3)
    return probe


def probe_loss(probe: Any, merged: Any, batch: Batch) -> Any:
    """Mean cross-entropy of the cell labels: kind, colour and (global views) order."""
    import mlx.core as mx
    import mlx.nn as nn

    labels = batch.labels
    kind = nn.losses.cross_entropy(probe.kind(merged), labels[..., 0]).mean()
    colour = nn.losses.cross_entropy(probe.colour(merged), labels[..., 1]).mean()
    seen = labels[..., 2] >= 0
    order = nn.losses.cross_entropy(probe.order(merged), mx.maximum(labels[..., 2], 0))
    return kind + colour + mx.sum(order * seen) / mx.sum(seen)


def answer_loss(model: Any, batch: Batch, features: Any) -> Any:
    """Mean cross-entropy over the answer tokens of the batch."""
    import mlx.core as mx
    import mlx.nn as nn

    from model.language import attention_mask, position_ids

    length = batch.ids.shape[1]
    logits = model(
        batch.ids,
        position_ids(batch.pad, 0, length),
        attention_mask(batch.pad, 0, length),
        None,
        embeddings=model.model.embed(batch.ids, features),
    )
    losses = nn.losses.cross_entropy(logits, batch.targets, reduction="none")
    return mx.sum(losses * batch.weights) / mx.sum(batch.weights)


def vision_loss(parts: Any, batch: Batch) -> tuple[Any, Any]:
    """Stage 1: the probe loss on the CLIP tower's merged cells (``parts``: vision, probe)."""
    loss = probe_loss(parts.probe, parts.vision.encode_crops(_crops(batch.rows)), batch)
    return loss, loss


def joint_loss(parts: Any, batch: Batch, probe_weight: float) -> tuple[Any, Any]:
    """Stage 2: answer loss plus the weighted probe loss (``parts``: model, probe)."""
    model = parts.model
    merged = model.vision.encode_crops(_crops(batch.rows))
    answer = answer_loss(model, batch, _slot_features(model, batch.rows, merged))
    return answer + probe_weight * probe_loss(parts.probe, merged, batch), answer


# ---------------------------------------------------------------------------------------------
# Training


def init_model(config: dict[str, Any], seed: int) -> Any:
    """A freshly initialised model (MLX default inits; small random separators and class token)."""
    import mlx.core as mx

    from model.config import ModelConfig
    from model.phi3_v import Model

    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict(config))
    vision = model.vision
    embeddings = vision.img_processor.vision_model.embeddings
    embeddings.class_embedding = 0.02 * mx.random.normal(embeddings.class_embedding.shape)
    vision.glb_GN = 0.02 * mx.random.normal(vision.glb_GN.shape)
    vision.sub_GN = 0.02 * mx.random.normal(vision.sub_GN.shape)
    mx.eval(model.parameters())
    return model


def schedule(settings: TrainSettings, steps: int) -> Any:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    import mlx.optimizers as optim

    peak, warmup = settings.learning_rate, settings.warmup
    rise = optim.linear_schedule(peak / warmup, peak, warmup)
    decay = optim.cosine_decay(peak, max(steps - warmup, 1), peak / 10)
    return optim.join_schedules([rise, decay], [warmup])


def run_stage(
    name: str,
    parts: Any,
    loss_fn: Callable[[Any, Batch], tuple[Any, Any]],
    batches: Iterable[Batch],
    steps: int,
    settings: TrainSettings,
) -> None:
    """AdamW with gradient clipping over ``batches``; logs the second output of ``loss_fn``."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    optimizer = optim.AdamW(schedule(settings, steps), weight_decay=settings.weight_decay)
    loss_and_grad = nn.value_and_grad(parts, loss_fn)
    running, start, waited = [], time.perf_counter(), 0.0
    batches = iter(batches)
    for step in range(1, steps + 1):
        tick = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - tick
        (loss, shown), grads = loss_and_grad(parts, batch)
        grads, _ = optim.clip_grad_norm(grads, settings.max_grad_norm)
        optimizer.update(parts, grads)
        mx.eval(loss, shown, parts.parameters(), optimizer.state)
        running.append(shown.item())
        if step % settings.log_every == 0 or step == steps:
            mean, elapsed = sum(running) / len(running), time.perf_counter() - start
            print(
                f"{name} step {step:4d}/{steps}  loss {mean:.4f}  {elapsed:4.0f}s"
                f" (waiting for data {waited:3.0f}s)",
                flush=True,
            )
            running = []


def _start_worker(tokenizer_dir: str, config: dict[str, Any], settings: TrainSettings) -> Any:
    """One spawned process that draws and preprocesses scenes (single-threaded numpy)."""
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # read by the child's numpy at start-up
    try:
        context = multiprocessing.get_context("spawn")
        args = (tokenizer_dir, config, settings.scene_seed, settings.batch_size)
        return context.Pool(1, initializer=_init_worker, initargs=args)
    finally:
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved


def train(
    config: dict[str, Any], processor: Any, tokenizer_dir: str, settings: TrainSettings
) -> Any:
    """Both training stages; returns the trained model."""
    from functools import partial

    import mlx.nn as nn

    model = init_model(config, settings.init_seed)
    parts = nn.Module()
    parts.probe = make_probe(4 * model.config.image_dim_out)
    pad_id = processor.pad_token_id
    with _start_worker(tokenizer_dir, config, settings) as pool:

        def batches(first: int, count: int) -> Iterator[Batch]:
            for examples in prefetch(pool, _worker_batch, range(first, first + count)):
                yield collate(examples, pad_id)

        parts.vision = model.vision
        run_stage(
            "vision",
            parts,
            vision_loss,
            batches(0, settings.vision_steps),
            settings.vision_steps,
            settings,
        )
        del parts["vision"]
        parts.model = model
        loss_fn = partial(joint_loss, probe_weight=settings.probe_weight)
        run_stage(
            "answers",
            parts,
            loss_fn,
            batches(settings.vision_steps, settings.steps),
            settings.steps,
            settings,
        )
    return model


# ---------------------------------------------------------------------------------------------
# Evaluation, checkpoint and samples


def exact_match(
    model: Any, processor: Any, examples: Sequence[tuple[Any, str, str]], batch_size: int
) -> tuple[float, list[str]]:
    """Fraction of (image, prompt, answer) examples whose greedy output equals the answer."""
    from model.generate import GenerationParams, generate_batch

    params = GenerationParams(max_tokens=24)
    outputs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [processor.prepare(prompt, image) for image, prompt, _ in chunk]
        outputs += [r.text.strip() for r in generate_batch(model, processor, rows, params)]
    hits = sum(out == answer for out, (_, _, answer) in zip(outputs, examples, strict=True))
    return hits / max(len(examples), 1), outputs


def caption_examples(seed: int, count: int) -> list[tuple[Any, str, str]]:
    """(image, caption prompt, caption) for ``count`` scenes of ``seed``."""
    from model.scenes import CAPTION_PROMPT, make_scenes

    return [(s.image, CAPTION_PROMPT, s.caption) for s in make_scenes(seed, count)]


def question_examples(seed: int, count: int) -> list[tuple[Any, str, str]]:
    """(image, question, answer): one random question for each of ``count`` scenes."""
    from model.scenes import make_scenes

    rng = np.random.default_rng([seed, 1])
    examples = []
    for scene in make_scenes(seed, count):
        questions = scene.questions()
        question, answer = questions[int(rng.integers(len(questions)))]
        examples.append((scene.image, question, answer))
    return examples


def hf_weights(model: Any) -> dict[str, np.ndarray]:
    """Model parameters under their Hugging Face names and PyTorch shapes, float32."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = {}
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value.astype(mx.float32))
        if name.endswith("patch_embedding.weight"):
            array = np.ascontiguousarray(array.transpose(0, 3, 1, 2))  # OHWI -> OIHW
        weights[name] = array
    return weights


def save_checkpoint(model: Any, config: dict[str, Any], out_dir: Path) -> None:
    """Write the model directory (HF layout) with the scene-language tokenizer."""
    from model.scenes import corpus
    from model.tiny import build_tokenizer, save_model

    save_model(out_dir, config, hf_weights(model), layout="hf", num_crops=NUM_CROPS)
    # save_model writes the default tiny tokenizer; put back the one the model was trained with.
    build_tokenizer(out_dir, corpus=corpus())


def write_samples(out_dir: Path, count: int = 12, seed: int = SAMPLES_SEED) -> Path:
    """Sample images (never seen in training) and ``captions.jsonl``: a caption and a question
    for each, with the expected answer."""
    from model.scenes import CAPTION_PROMPT, make_scenes

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    lines = []
    for k, scene in enumerate(make_scenes(seed, count)):
        name = f"scene_{k:02d}.png"
        scene.image.save(out_dir / name)
        questions = scene.questions()
        question, answer = questions[int(rng.integers(len(questions)))]
        for kind, prompt, expected in (
            ("caption", CAPTION_PROMPT, scene.caption),
            ("question", question, answer),
        ):
            lines.append(
                {"id": f"{k:02d}-{kind}", "image": name, "prompt": prompt, "expected": expected}
            )
    path = out_dir / "captions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def report(model_dir: str, count: int) -> None:
    """Print held-out exact match: captions at batch 16, batch 1 and 8-bit; questions."""
    from model.loading import load

    captions = caption_examples(HELD_OUT_SEED, count)
    model, processor = load(model_dir)
    acc16, out16 = exact_match(model, processor, captions, 16)
    acc1, out1 = exact_match(model, processor, captions, 1)
    questions, _ = exact_match(model, processor, question_examples(HELD_OUT_SEED, count), 16)
    model8, processor8 = load(model_dir, quantize=8)
    acc8, _ = exact_match(model8, processor8, captions, 16)
    print(
        f"held-out captions ({count}): batch 16 {acc16:.3f}, batch 1 {acc1:.3f}, "
        f"8-bit {acc8:.3f}; batch 1 == batch 16: {out1 == out16}"
    )
    print(f"held-out questions ({count}): {questions:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    from jobrunner._blas import prepare_process

    prepare_process()
    parser = argparse.ArgumentParser(description="Train the demo Phi-3-V on synthetic scenes.")
    parser.add_argument("--out", type=Path, default=Path("model/demo"))
    parser.add_argument("--samples", type=Path, default=Path("jobs/demo"))
    parser.add_argument("--vision-steps", type=int, default=TrainSettings.vision_steps)
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--held-out", type=int, default=200, help="scenes to evaluate on")
    args = parser.parse_args(argv)

    from model.config import ModelConfig
    from model.processing import Processor
    from model.scenes import corpus
    from model.tiny import build_tokenizer

    settings = TrainSettings(vision_steps=args.vision_steps, steps=args.steps)
    config = demo_config()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        build_tokenizer(Path(tokenizer_dir), corpus=corpus())
        processor = Processor.from_pretrained(
            tokenizer_dir, ModelConfig.from_dict(config), num_crops=NUM_CROPS
        )
        model = train(config, processor, tokenizer_dir, settings)
    print(f"training took {time.perf_counter() - start:.0f}s", flush=True)
    if args.out.exists():
        shutil.rmtree(args.out)
    save_checkpoint(model, config, args.out)
    write_samples(args.samples)
    report(str(args.out), args.held_out)


if __name__ == "__main__":
    main()
