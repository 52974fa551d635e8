"""Batched, KV-cached generation: token ids and pixels in, token ids out; knows nothing of files.

A batch of prepared rows is left-padded to one length. Each row gets its own position ids (0 at
its first real token) and a mask hiding the padding, so its logits are those it would get alone.
Prefill runs over the whole prompt (in chunks for long prompts), then decoding feeds one token per
row per step into a cache written in place. Sampling draws its randomness from a counter-based
hash of (row seed, step, token id), so a sampled row's output does not depend on its batch either.
Rows that stop leave the batch once enough of them have finished, and new rows can take their
places mid-way (``Decoder``, continuous batching): each row's positions, mask and noise are its
own, so joining a running batch changes nothing in its output either.

Prefilled row by row, a row with images runs in two parts: its prompt up to its last image slot
(the prefix), then the rest. Rows with the same images and the same text before them (several
prompts over one image) share the prefix, whose keys and values a ``PrefixCache`` keeps, so it is
computed and its images encoded once. Every row is split the same way whether or not its prefix
is cached, so its output does not depend on which rows came before it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import ImageFeatureCache, KVCache, PrefixCache, make_cache, stack_rows
from .language import attention_mask, position_ids
from .phi3_v import Model
from .processing import ImageInput, PreparedRow, Processor, image_feature_index


@dataclass(frozen=True)
class GenerationParams:
    # Most tokens a row generates; a row may ask for fewer (``PreparedRow.max_tokens``).
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    # Prompt positions per prefill call and crops per vision-tower call: they bound activation
    # memory. None: sized to the device (see ``chunk_sizes``).
    prefill_chunk: int | None = None
    vision_chunk: int | None = None
    # Prefill row by row (no compute on padding) or the padded batch at once; None: row by
    # row on the CPU, where attention's cost on padding dominates, batched on a GPU, where
    # each new prompt length costs a new attention plan and batches have fewer lengths.
    row_prefill: bool | None = None
    # Prompt lengths rounded up to a multiple of ``LENGTH_BUCKET`` (more left padding) and
    # attention over the whole KV buffer, so that shapes repeat; None: under CUDA, whose attention
    # is planned per shape (see ``static_shapes``).
    static_shapes: bool | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        for name in ("prefill_chunk", "vision_chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass
class RowResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    output_tokens: int


def row_seed(job_seed: int, row_id: str) -> int:
    """A 32-bit seed for one row, from the job seed and the row's id (not its batch)."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _hash_uniform(seeds: mx.array, steps: mx.array, vocab: int) -> mx.array:
    """Uniform (0, 1) noise ``[B, vocab]`` from a murmur3-style mix of (seed, step, token), each
    row's ``steps`` its own (uint32, ``[B]``)."""
    x = seeds[:, None] ^ (steps * mx.array(0x9E3779B1, dtype=mx.uint32))[:, None]
    x = x + mx.arange(vocab, dtype=mx.uint32)[None] * mx.array(0x85EBCA77, dtype=mx.uint32)
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        x = (x ^ (x >> shift)) * mx.array(mult, dtype=mx.uint32)
    x = x ^ (x >> 16)
    return ((x >> 8).astype(mx.float32) + 0.5) / float(1 << 24)


def sample(
    logits: mx.array, params: GenerationParams, seeds: mx.array, steps: mx.array
) -> mx.array:
    """Next tokens ``[B]`` from float32 ``logits`` ``[B, V]``: greedy, or Gumbel-max sampling
    after temperature, top-k and top-p, with noise drawn for each row's seed and step (uint32
    ``[B]``: the count of tokens the row sampled before)."""
    if params.temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(logits, axis=-1)[:, vocab - params.top_k][:, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if params.top_p < 1.0:
        probs = mx.softmax(logits, axis=-1)
        ordered = mx.sort(probs, axis=-1)[:, ::-1]
        before = mx.cumsum(ordered, axis=-1) - ordered
        # smallest probability still inside the nucleus (the top token always is)
        floor = mx.min(mx.where(before < params.top_p, ordered, mx.inf), axis=-1, keepdims=True)
        logits = mx.where(probs < floor, -mx.inf, logits)
    gumbel = -mx.log(-mx.log(_hash_uniform(seeds, steps, vocab)))
    return mx.argmax(logits + gumbel, axis=-1)


_CPU_PREFILL_CHUNK = 256
_CPU_VISION_BYTES = 8 << 20


def chunk_sizes(model: Model, params: GenerationParams) -> tuple[int, int]:
    """``(prefill_chunk, vision_chunk)``: the params' values, or the device's defaults.

    On a GPU, 2048 positions and 32 crops. On the CPU, smaller calls are faster: 256 positions
    (prefill of a 975-token prompt 0.39-0.40 s -> 0.33-0.34 s on the small bench preset, chunk
    attention skipping later keys) and as many crops as keep one MLP activation within 8 MiB
    (one crop of the real CLIP tower; per-crop time at 8 crops per call was 1.5x that of 1).
    """
    gpu = mx.default_device() != mx.cpu
    prefill_chunk = params.prefill_chunk or (2048 if gpu else _CPU_PREFILL_CHUNK)
    if params.vision_chunk or gpu:
        return prefill_chunk, params.vision_chunk or 32
    vision = model.vision.vision_config
    itemsize = activation_dtype(model).size
    crop_bytes = (vision.grid_size**2 + 1) * vision.intermediate_size * itemsize
    return prefill_chunk, max(1, _CPU_VISION_BYTES // crop_bytes)


LENGTH_BUCKET = 128


def static_shapes(params: GenerationParams) -> bool:
    """Whether to keep shapes static: the params' choice, else when running on CUDA.

    MLX's CUDA backend builds a cuDNN attention graph for every new combination of shapes, and
    its fallback kernels are set up per shape too. A prompt length or a cache length seen for
    the first time cost 0.04-1.6 s (prefill) and 7-19 ms (one decode step) on an H100, against
    0.2-1.1 ms once planned. With lengths in buckets of ``LENGTH_BUCKET`` and attention over the
    whole KV buffer (256-position blocks), a job sees a few dozen shapes instead of one per
    prompt length and decode step. On the CPU nothing is planned, and the extra keys would cost;
    MLX's Metal attention kernels are specialised by dtype, head size and a few flags
    (alignment, mask, causal), not by length, so Apple GPUs keep exact shapes (not measured on
    one here).

    The planner's padding figures and its ``max_batch_tokens`` budget count the rows' own
    lengths: the bucket adds up to ``LENGTH_BUCKET - 1`` padded positions to each row of a batch.
    """
    if params.static_shapes is not None:
        return params.static_shapes
    return mx.default_device() != mx.cpu and mx.cuda.is_available()


def image_features(
    model: Model,
    rows: Sequence[PreparedRow],
    chunk: int | None = None,
    cache: ImageFeatureCache | None = None,
) -> mx.array | None:
    """Projected features of every image of the batch, in slot order (row by row), encoded
    ``chunk`` crops per call (default: the device's, see ``chunk_sizes``).

    Each distinct image (by content hash) is encoded once, however many rows share it; with a
    ``cache``, images seen in earlier batches are not encoded again.
    """
    images = [image for row in rows for image in row.images]
    if not images:
        return None
    known = {}
    if cache is not None:
        known = {im.key: f for im in images if (f := cache.get(im.key)) is not None}
    todo = list({im.key: im for im in images if im.key not in known}.values())
    if todo:
        chunk = chunk or chunk_sizes(model, GenerationParams())[1]
        fresh = _encode_images(model, todo, chunk)
        ends = np.cumsum([image.num_tokens for image in todo])[:-1].tolist()
        for image, features in zip(todo, mx.split(fresh, ends), strict=True):
            if cache is not None:
                # a copy: a slice would keep the whole batch's features alive in the cache
                features = features + 0
                cache.put(image.key, features)
            known[image.key] = features
    if len(images) == 1:
        return known[images[0].key]
    return mx.concatenate([known[image.key] for image in images])


def features_by_row(
    rows: Sequence[PreparedRow], features: mx.array | None, need: Sequence[int] | None = None
) -> list[mx.array | None]:
    """``features`` of the rows numbered ``need`` (default: every row with images), in slot
    order, split into one entry per row of ``rows``; None for the others."""
    if need is None:
        need = [b for b, row in enumerate(rows) if row.images]
    out: list[mx.array | None] = [None] * len(rows)
    start = 0
    for b in need:
        count = sum(image.num_tokens for image in rows[b].images)
        out[b] = features[start : start + count]
        start += count
    return out


def _encode_images(model: Model, images: Sequence[ImageInput], chunk: int) -> mx.array:
    """All crops of ``images`` through the tower (``chunk`` crops per call), then projected.

    On the CPU each image goes through on its own: BLAS results can change with a matmul's
    shape, so features encoded beside other images would depend on the batch (and on what the
    caches held) in the last bits, and float32 outputs are promised exact. A GPU takes the
    crops of all images together, ``chunk`` per call.
    """
    if len(images) > 1 and mx.default_device() == mx.cpu:
        return mx.concatenate([_encode_images(model, [image], chunk) for image in images])
    vision = model.vision
    side = vision.vision_config.tokens_per_side
    index, offset = [], 0
    for image in images:
        index.append(image_feature_index(image.h_crop, image.w_crop, offset, side))
        offset += image.crops.shape[0]
    crops = np.concatenate([image.crops for image in images])
    merged = [
        vision.encode_crops(mx.array(crops[start : start + chunk]))
        for start in range(0, len(crops), chunk)
    ]
    return vision.project(mx.concatenate(merged), mx.array(np.concatenate(index)))


def activation_dtype(model: Model) -> mx.Dtype:
    """The dtype activations and the KV cache take: the final norm's, never quantized (a
    quantized embedding holds packed ``uint32``)."""
    return model.model.norm.weight.dtype


def kv_bytes_per_token(model: Model) -> int:
    """Bytes of keys and values one prompt or generated position holds in the cache."""
    c = model.config
    itemsize = activation_dtype(model).size
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * itemsize


def device_memory_bytes() -> int | None:
    """The GPU's memory when the device reports it, else the memory this process may use: the
    machine's physical memory, or less where a container (cgroup) or ``ulimit -v`` caps it."""
    if mx.default_device() != mx.cpu:
        size = mx.device_info().get("memory_size")
        if size:
            return int(size)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        physical = None
    limits = [physical, cgroup_memory_limit(), _address_space_limit()]
    known = [limit for limit in limits if limit]
    return min(known) if known else None


# a cgroup v1 "no limit" is the largest page-aligned int64, not a word
_UNLIMITED = 1 << 62


def cgroup_memory_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """The smallest memory limit on this process's cgroup and its ancestors (v2 ``memory.max``,
    v1 ``memory.limit_in_bytes``), or None where there is none or it cannot be read. Inside a
    container the cgroup path is the host's; the container's own limit is then at the root."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = base / path.strip("/")
        levels = [folder, *folder.parents] if folder.is_relative_to(base) else [base]
        limits += [_limit_in(level / name) for level in levels if level.is_relative_to(base)]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def _limit_in(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= _UNLIMITED:  # "max" (v2) or v1's huge number
        return None
    return int(text)


def _address_space_limit() -> int | None:
    """``ulimit -v`` (RLIMIT_AS), which caps every allocation, or None."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def weight_bytes(model: Model) -> int:
    """Bytes the model's parameters take (as loaded: dtype and quantization applied)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def batch_limits(
    model: Model,
    max_tokens: int,
    memory_bytes: int,
    prompt_tokens: int = 1024,
    fraction: float = 0.5,
) -> tuple[int, int]:
    """``(batch_size, max_batch_tokens)`` whose KV cache fits in memory.

    ``fraction`` of the memory left beside the weights goes to the cache (the rest is left to
    activations, image features and the framework's own pools); a batch of rows of about
    ``prompt_tokens`` then holds ``batch_size`` rows of prompt plus ``max_tokens``.

    Args:
        memory_bytes: the device's memory (or the machine's, on a CPU).
    Returns:
        The batch size (at least 1, at most 256) and the prompt-slot budget for the planner.
    """
    slots = memory_kv_positions(model, memory_bytes, fraction=fraction)
    batch_size = max(1, min(256, slots // (prompt_tokens + max_tokens)))
    return batch_size, max(prompt_tokens, batch_size * prompt_tokens)


def memory_kv_positions(
    model: Model, memory_bytes: int, reserved_bytes: int = 0, fraction: float = 0.5
) -> int:
    """KV positions (all rows of a batch together) that fit in ``fraction`` of the memory left
    beside the weights and ``reserved_bytes`` (the feature and prefix caches), as in
    ``batch_limits``; the rest is left to activations, the row-by-row prefill's copy of one
    row, and the prompts of rows joining a running batch while its cache is rebuilt around them
    (a layer at a time)."""
    room = max(memory_bytes - weight_bytes(model) - reserved_bytes, 0) * fraction
    return int(room // kv_bytes_per_token(model))


def token_limit(own: int | None, most: int) -> int:
    """Most tokens a row generates: its ``own`` limit where it has one, at most ``most`` (the
    job's ``max_tokens``, the most any row may ask for)."""
    return min(own or most, most)


def kv_positions(longest: int, room: int, static: bool = False) -> int:
    """KV positions each row of a batch allocates when its longest row holds ``longest``
    positions: every row is left-padded to it (rounded up to ``LENGTH_BUCKET`` under static
    shapes) and has room for ``room`` more (the most tokens any of its rows may generate), in
    whole ``KVCache.step`` blocks."""
    if static:
        longest = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET
    return -(-(longest + room) // KVCache.step) * KVCache.step


def _left_pad(
    rows: Sequence[PreparedRow], pad_id: int, multiple: int = 1
) -> tuple[mx.array, mx.array]:
    """Ids ``[B, L]`` left-padded to the longest row (rounded up to ``multiple``) and each
    row's padding ``[B]``."""
    length = -(-max(len(row.input_ids) for row in rows) // multiple) * multiple
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    pad = np.zeros(len(rows), dtype=np.int32)
    for b, row in enumerate(rows):
        pad[b] = length - len(row.input_ids)
        ids[b, pad[b] :] = row.input_ids
    return mx.array(ids), mx.array(pad)


def prefill(
    model: Model,
    ids: mx.array,
    pad: mx.array,
    cache: list[KVCache],
    features: mx.array | None,
    chunk: int,
    logits: bool = True,
    span: mx.array | None = None,
) -> mx.array | None:
    """Run ``ids`` through the model after what ``cache`` holds, filling it; return the last
    position's logits (None without ``logits``).

    Only the last position goes through ``lm_head``: the others' logits are never read, and
    for a long prompt they would cost as much as the rest of the model. Rotary factors are
    chosen for each row's whole prompt, ``span`` ``[B]`` positions (default: what the cache
    holds plus ``ids``), as the reference's single pass over the prompt chooses them.
    """
    embeddings = model.model.embed(ids, features)
    base, length = cache[0].offset, ids.shape[1]
    if span is None:
        span = base + length - pad
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        hidden = model.model(
            ids[:, start:end],
            position_ids(pad, base + start, end - start),
            attention_mask(pad, base + start, end - start, cache[0].visible(base + end)),
            cache,
            embeddings=embeddings[:, start:end],
            rope_span=span,
        )
        if end < length:
            mx.eval([c.keys for c in cache])
    if not logits:
        return None
    return model.lm_head(hidden[:, -1]).astype(mx.float32)


def prompt_prefix(row: PreparedRow, long_rope: bool = False) -> tuple[int, str] | None:
    """``(length, key)`` of the row's prompt up to and including its last image slot, the part
    that rows with the same images and the same text before them share; None for a row without
    images or with nothing after its last image (then there is no second part to prefill).

    ``long_rope``: the whole prompt takes the long rotary factors
    (``model.model.rope.is_long(len(row.input_ids))``); the prefix's keys depend on it, so the
    key does too.
    """
    if not row.images:
        return None
    ids = np.asarray(row.input_ids, dtype=np.int32)
    length = int(np.flatnonzero(ids < 0)[-1]) + 1
    if length >= len(ids):
        return None
    digest = hashlib.sha256(ids[:length].tobytes())
    for image in row.images:
        digest.update(f"|{image.key}".encode())
    if long_rope:
        digest.update(b"|long-rope")
    return length, digest.hexdigest()


def _row_prefix(model: Model, row: PreparedRow) -> tuple[int, str] | None:
    return prompt_prefix(row, model.model.rope.is_long(len(row.input_ids)))


def prefill_rows(
    model: Model,
    rows: Sequence[PreparedRow],
    length: int,
    cache: list[KVCache],
    features: Sequence[mx.array | None],
    chunk: int,
    multiple: int = 1,
    prefixes: PrefixCache | None = None,
    known: dict[int, list[tuple[mx.array, mx.array]]] | None = None,
) -> mx.array:
    """``prefill`` one row at a time into the left-padded batch cache of ``length`` positions.

    No position is computed for the batch's padding, so a row costs what its own prompt costs
    (attention grows with the square of the length), and each row's prompt pass is exactly its
    pass alone. With ``multiple`` > 1 (static shapes), a row is left-padded to a multiple of it
    and prefilled through a static cache, as it would be alone. Otherwise a row with images is
    prefilled in two parts (``prompt_prefix``); the first comes from ``known`` (row number to
    the prefix's keys and values, looked up before the batch's images were encoded) or
    ``prefixes`` when there, and goes into ``prefixes`` when computed.

    Args:
        features: each row's image features (None for a row without images, or whose prefix
            is in ``known``).
    """
    for c in cache:
        c.offset = length
    static = multiple > 1
    pad_id = int(model.config.pad_token_id or 0)  # any id: padding is masked
    known = known or {}
    logits = []
    for b, row in enumerate(rows):
        ids, pad = _left_pad([row], pad_id, multiple)
        row_cache = make_cache(len(cache), static)
        for c in row_cache:
            c.reserve(ids.shape[1])
        prefix = None if static else _row_prefix(model, row)
        if prefix is None:
            logits.append(prefill(model, ids, pad, row_cache, features[b], chunk))
        else:
            split, key = prefix
            states = known.get(b)
            if states is not None and prefixes is not None:
                prefixes.hits += 1  # looked up uncounted before the batch's images were encoded
            elif prefixes is not None:
                states = prefixes.get(key)
            if states is None:
                whole = mx.array([len(row.input_ids)])  # the prefix's factors: the prompt's
                prefill(model, ids[:, :split], pad, row_cache, features[b], chunk, False, whole)
                kept = []
                if prefixes is not None and prefixes.fits(split * kv_bytes_per_token(model)):
                    # copies: slices would keep the row's buffers alive
                    kept = [(k + 0, v + 0) for k, v in (c.state for c in row_cache)]
                mx.eval([c.keys for c in row_cache], [c.values for c in row_cache], kept)
                if kept:
                    prefixes.put(key, kept)
            else:
                for c, (k, v) in zip(row_cache, states, strict=True):
                    c.update_and_fetch(k, v)
            logits.append(prefill(model, ids[:, split:], pad, row_cache, None, chunk))
        for c, own in zip(cache, row_cache, strict=True):
            c.write_row(b, len(rows), *own.state)
        mx.eval(logits[-1], [c.keys for c in cache], [c.values for c in cache])
    return mx.concatenate(logits)


def decode_step(model: Model, tokens: mx.array, pad: mx.array, cache: list[KVCache]) -> mx.array:
    """Logits ``[B, V]`` for one new token per row."""
    offset = cache[0].offset
    mask = attention_mask(pad, offset, 1, cache[0].visible(offset + 1))
    logits = model(tokens[:, None], position_ids(pad, offset, 1), mask, cache)
    return logits[:, -1]


@dataclass
class _Live:
    """One row in the batch: what it holds in the cache and what it has generated."""

    tag: Hashable
    row: PreparedRow
    length: int  # positions it holds: prompt and the tokens fed back so far
    limit: int  # most tokens it generates
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None

    def result(self, processor: Processor) -> RowResult:
        return RowResult(
            token_ids=self.tokens,
            text=processor.decode(self.tokens),
            finish_reason=self.finish or "length",
            prompt_tokens=len(self.row.input_ids),
            output_tokens=len(self.tokens),
        )


@dataclass
class _Prefilled:
    """Rows prefilled on their own, waiting to join a batch."""

    live: list[_Live]
    cache: list[KVCache | None]
    tokens: mx.array  # each row's first token
    seeds: mx.array
    steps: mx.array


class Decoder:
    """Rows decoding together, joined by new rows as others finish (continuous batching).

    ``add`` prefills rows and puts them in the batch, ``step`` decodes one token for every row
    and returns the rows that finished. The batch's cache is left-padded to its longest row; rows
    that finish stay in it until a quarter of it has (each step costs little more for them), then
    leave; when rows are added, the finished rows leave and the cache is rebuilt around the rows
    that remain, cut to the longest of them (``stack_rows``). A row's positions, mask and
    sampling noise (drawn for its own step) are its own, so each row generates what it would
    generate alone, however rows come and go around it.
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        params: GenerationParams,
        feature_cache: ImageFeatureCache | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.model, self.processor, self.params = model, processor, params
        self.feature_cache, self.prefix_cache = feature_cache, prefix_cache
        self.static = static_shapes(params)
        self.live: list[_Live] = []
        self.cache: list[KVCache] = []
        # per row: its last sampled token (the next input, not yet recorded), seed and the
        # step that token's successor draws its noise for; all in batch order
        self.tokens = self.seeds = self.steps = self.pad = mx.array([], dtype=mx.int32)

    @property
    def active(self) -> int:
        """Rows still generating."""
        return sum(live.finish is None for live in self.live)

    @property
    def longest(self) -> int:
        """Positions the longest row still generating holds (0 when none is)."""
        return max((live.length for live in self.live if live.finish is None), default=0)

    @property
    def longest_prompt(self) -> int:
        """Prompt tokens of the longest prompt still generating (0 when none is)."""
        going = [len(live.row.input_ids) for live in self.live if live.finish is None]
        return max(going, default=0)

    @property
    def room(self) -> int:
        """The most tokens a row still generating may yet generate (0 when none is)."""
        going = [live.limit - len(live.tokens) for live in self.live if live.finish is None]
        return max(going, default=0)

    @property
    def finished(self) -> int:
        """Rows that finished but are still in the batch (they leave with ``drop``)."""
        return len(self.live) - self.active

    @property
    def crowded(self) -> bool:
        """Whether finished rows are a quarter of the batch: time they left (``drop``)."""
        return self.finished * 4 >= len(self.live) > 0

    def limit(self, row: PreparedRow) -> int:
        """Most tokens ``row`` generates: its own ``max_tokens``, at most ``params.max_tokens``
        (the most any row may ask for)."""
        return token_limit(row.max_tokens, self.params.max_tokens)

    def clear(self) -> None:
        """Drop every row (after a failure: the caller decides what becomes of them)."""
        self.live, self.cache = [], []
        self.tokens = self.seeds = self.steps = self.pad = mx.array([], dtype=mx.int32)

    def add(self, items: Sequence[tuple[Hashable, PreparedRow, int]]) -> None:
        """Prefill ``(tag, row, seed)`` items and add them to the batch."""
        if items:
            self.join(self.prefill(items))

    def prefill(self, items: Sequence[tuple[Hashable, PreparedRow, int]]) -> _Prefilled:
        """Prefill ``(tag, row, seed)`` items on their own; the batch is not touched, so a
        failure here is the items' (``join`` adds them)."""
        rows = [row for _, row, _ in items]
        # rows joining others get a cache of their prompts only: the join makes the room
        cache, logits = self._prefill(rows, decode_room=not self.active)
        seeds = mx.array(np.asarray([seed for _, _, seed in items], dtype=np.uint32))
        steps = mx.zeros(len(items), dtype=mx.uint32)
        tokens = sample(logits, self.params, seeds, steps)
        mx.async_eval(tokens)
        live = [_Live(tag, row, len(row.input_ids), self.limit(row)) for tag, row, _ in items]
        return _Prefilled(live, cache, tokens, seeds, steps)

    def join(self, new: _Prefilled) -> None:
        """Add prefilled rows to the batch; the rows that finished leave it."""
        if not self.active:  # nothing to join: the batch is the new rows, as prefilled
            self.live, self.cache = new.live, new.cache
            self.tokens, self.seeds, self.steps = new.tokens, new.seeds, new.steps
            width = new.cache[0].offset
            self.pad = mx.array([width - live.length for live in new.live], dtype=mx.int32)
            return
        self._rebuild(new)

    def step(self, drop: bool = True) -> list[tuple[Hashable, RowResult]]:
        """Decode one token for every row; the rows that finished with it, as ``(tag,
        result)``. With ``drop``, finished rows leave once they are a quarter of the batch
        (a caller about to add rows leaves that to ``join``, which drops them anyway)."""
        going = [live for live in self.live if live.finish is None]
        # queue the next step before waiting on this one, unless every row ends with this one
        ahead = any(len(live.tokens) + 1 < live.limit for live in going)
        if ahead:
            logits = decode_step(self.model, self.tokens, self.pad, self.cache)
            following = sample(logits, self.params, self.seeds, self.steps + 1)
            mx.async_eval(following)
        done = []
        for live, token in zip(self.live, self.tokens.tolist(), strict=True):
            if live.finish is not None:
                continue
            if token in self.processor.stop_token_ids:
                live.finish = "stop"
            else:
                live.tokens.append(token)
                if len(live.tokens) == live.limit:
                    live.finish = "length"
            if live.finish is not None:
                done.append((live.tag, live.result(self.processor)))
        if not ahead or not self.active:
            self.clear()
            return done
        for live in self.live:
            live.length += 1  # this step's token went into the cache
        self.tokens, self.steps = following, self.steps + 1
        if drop and self.crowded:  # less work per step
            self.drop()
        return done

    def drop(self) -> None:
        """Let the finished rows leave the batch."""
        if self.finished:
            self._rebuild()

    def _rebuild(self, new: _Prefilled | None = None) -> None:
        """The batch of the rows still generating followed by ``new``'s rows: their cache cut
        to the longest row, with room for the steps still to come. Built a layer at a time,
        each old layer (and prefill layer) let go once its successor is evaluated, so the
        rebuild holds about the larger of the new cache and the caches it joins, plus a layer."""
        keep = [i for i, live in enumerate(self.live) if live.finish is None]
        index = mx.array(keep)
        arrays = [self.tokens[index], self.seeds[index], self.steps[index]]
        if new is not None:
            joining = (new.tokens, new.seeds, new.steps)
            arrays = [mx.concatenate(pair) for pair in zip(arrays, joining, strict=True)]
        self.tokens, self.seeds, self.steps = arrays
        mx.eval(self.tokens)  # the step in flight reads the old cache
        self.live = [self.live[i] for i in keep] + (new.live if new else [])
        width = max(live.length for live in self.live)
        # each row feeds back at most its limit - (its tokens so far) more tokens
        room = max(live.limit - len(live.tokens) for live in self.live)
        for layer, old in enumerate(self.cache):
            parts = [(old, index)] if new is None else [(old, index), (new.cache[layer], None)]
            cache = stack_rows(parts, width, width + room, self.static)
            mx.eval(cache.keys, cache.values)
            self.cache[layer] = cache
            if new is not None:
                new.cache[layer] = None  # let go of the prefill's copy too
        self.pad = mx.array([width - live.length for live in self.live], dtype=mx.int32)

    def _prefill(
        self, rows: Sequence[PreparedRow], decode_room: bool = True
    ) -> tuple[list[KVCache], mx.array]:
        """A cache holding ``rows``' prompts, left-padded (with room for decoding them, if
        ``decode_room``), and their last positions' logits."""
        model, params = self.model, self.params
        multiple = LENGTH_BUCKET if self.static else 1
        ids, pad = _left_pad(rows, self.processor.pad_token_id, multiple)
        cache = make_cache(len(model.layers), self.static)
        for c in cache:
            c.reserve(ids.shape[1] + (max(map(self.limit, rows)) if decode_room else 0))
        prefill_chunk, vision_chunk = chunk_sizes(model, params)
        row_prefill = params.row_prefill
        if row_prefill is None:
            row_prefill = mx.default_device() == mx.cpu
        if not row_prefill:
            features = image_features(model, rows, vision_chunk, self.feature_cache)
            return cache, prefill(model, ids, pad, cache, features, prefill_chunk)
        # rows whose prefix is cached need neither their images encoded nor the prefix run
        known = {}
        prefix_cache = self.prefix_cache
        if prefix_cache is not None and not self.static:
            prefixes = {b: _row_prefix(model, row) for b, row in enumerate(rows)}
            known = {
                b: states
                for b, prefix in prefixes.items()
                if prefix is not None
                and (states := prefix_cache.get(prefix[1], count=False)) is not None
            }
        need = [b for b, row in enumerate(rows) if row.images and b not in known]
        encoded = image_features(model, [rows[b] for b in need], vision_chunk, self.feature_cache)
        features = features_by_row(rows, encoded, need)
        logits = prefill_rows(
            model, rows, ids.shape[1], cache, features, prefill_chunk, multiple, prefix_cache, known
        )
        return cache, logits


def generate_batch(
    model: Model,
    processor: Processor,
    rows: Sequence[PreparedRow],
    params: GenerationParams,
    seeds: Sequence[int] | None = None,
    feature_cache: ImageFeatureCache | None = None,
    prefix_cache: PrefixCache | None = None,
) -> list[RowResult]:
    """Generate for a batch of prepared rows; each row's result is what it would get alone.

    Args:
        rows: prompts with image slots (negative ids) and their images, each with its own
            limit on generated tokens if it has one (``max_tokens``).
        params: decoding settings; greedy when ``temperature == 0``.
        seeds: one 32-bit seed per row (see ``row_seed``); needed only for sampling.
        feature_cache: image features kept across batches (rows sharing an image in
            different batches); images shared inside the batch are encoded once regardless.
        prefix_cache: keys and values of prompt prefixes up to the last image (see
            ``prompt_prefix``), kept across batches; used when prefilling row by row.
    Returns:
        One ``RowResult`` per row, in the order given.
    """
    if not rows:
        return []
    decoder = Decoder(model, processor, params, feature_cache, prefix_cache)
    decoder.add(list(zip(range(len(rows)), rows, seeds or [0] * len(rows), strict=True)))
    results: dict[Hashable, RowResult] = {}
    while decoder.active:
        results.update(decoder.step())
    return [results[b] for b in range(len(rows))]
