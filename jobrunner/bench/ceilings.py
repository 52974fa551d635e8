"""The machine's ceilings (matmul GFLOP/s, memory read GB/s) and the roofline: prefill and the
batch-1 decode step measured against them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from model.cache import make_cache
from model.generate import (
    LENGTH_BUCKET,
    GenerationParams,
    _left_pad,
    chunk_sizes,
    decode_step,
    image_features,
    prefill,
    static_shapes,
)
from model.loading import DTYPES

# ---------------------------------------------------------------------------------------------
# Ceilings


def _best_seconds(func: Callable[[], Any], repeats: int = 5) -> float:
    mx.eval(func())  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(func())
        best = min(best, time.perf_counter() - start)
    return best


def measure_ceilings(dtype: str, gpu: bool, quick: bool = False) -> dict[str, float]:
    """Dense matmul GFLOP/s and memory read GB/s through MLX, in the model's dtype.

    ``quick`` uses small operands (for the tiny preset): the figures are then lower bounds.
    """
    dt = DTYPES[dtype]
    n = 512 if quick else 8192 if gpu else 2048
    a = mx.random.normal((n, n)).astype(dt)
    b = mx.random.normal((n, n)).astype(dt)
    mx.eval(a, b)
    matmul = 2 * n**3 / _best_seconds(lambda: a @ b) / 1e9
    # fp32 buffers of 4 GiB (GPU), 256 MiB (CPU) or 16 MiB (quick): far larger than caches
    rows = (1 << 22 if quick else 1 << 30 if gpu else 1 << 26) // 1024
    big = mx.random.normal((rows, 1024))
    vec = mx.random.normal((1, 1024))
    mx.eval(big, vec)
    reduce_gbs = big.nbytes / _best_seconds(lambda: big.sum(axis=-1)) / 1e9
    gemv_gbs = big.nbytes / _best_seconds(lambda: vec @ big.T) / 1e9
    return {
        "matmul_gflops": matmul,
        "matmul_size": n,
        "read_gbs_reduce": reduce_gbs,
        "read_gbs_gemv": gemv_gbs,
        "read_gbs": max(reduce_gbs, gemv_gbs),
    }


# ---------------------------------------------------------------------------------------------
# Roofline: batch-1 decode step and prefill against the ceilings


def decoder_weight_bytes(model) -> int:
    """Bytes read per decode step: decoder layers, final norm and ``lm_head`` (not vision)."""
    return sum(
        int(v.nbytes)
        for k, v in tree_flatten(model.parameters())
        if k.startswith(("model.layers.", "model.norm.", "lm_head."))
    )


def prefill_flops(model, batch: int, length: int) -> float:
    """Useful matmul FLOPs of prefill: linears on every slot, causal attention (query ``i``
    against its ``i + 1`` keys: QK^T and AV) and ``lm_head`` on the last position.

    The CPU path skips most masked keys but not all of them; they are not counted.
    """
    c = model.config
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    linear = 2 * length * c.hidden_size * (qkv + c.hidden_size + 3 * c.intermediate_size)
    attention = 4 * c.num_attention_heads * c.head_dim * length * (length + 1) // 2
    return batch * (c.num_hidden_layers * (linear + attention) + 2 * c.hidden_size * c.vocab_size)


def roofline(model, processor, prepared, ceilings: dict[str, float]) -> dict[str, Any]:
    """Prefill GFLOP/s of the longest row (rows are prefilled one at a time, in the engine's
    chunks and shapes, here in one pass: the engine's split of an image row after its last
    image slot adds a call, not FLOPs) and the batch-1 decode step against streaming the
    decoder's weights once.

    Prefill FLOPs count the row's own tokens: where the engine pads a prompt to a length bucket
    (static shapes, on a GPU), the padding's work is not counted as useful.
    """
    row = max(prepared, key=lambda r: len(r.input_ids))
    params = GenerationParams()
    chunk = chunk_sizes(model, params)[0]
    static = static_shapes(params)
    features = image_features(model, [row])
    ids, pad = _left_pad([row], processor.pad_token_id, LENGTH_BUCKET if static else 1)
    mx.eval(features, ids, pad)

    def run_prefill():
        cache = make_cache(len(model.layers), static)
        for c in cache:
            c.reserve(ids.shape[1])
        return prefill(model, ids, pad, cache, features, chunk)

    seconds = _best_seconds(run_prefill, repeats=5)
    flops = prefill_flops(model, 1, len(row.input_ids))
    step = _decode_step_seconds(model, ids, pad, features, chunk, static)
    weight_bytes = decoder_weight_bytes(model)
    ideal = weight_bytes / (ceilings["read_gbs"] * 1e9)
    return {
        "prefill_tokens": len(row.input_ids),
        "prefill_chunk": chunk,
        "prefill_seconds": seconds,
        "prefill_gflops": flops / seconds / 1e9,
        "prefill_fraction_of_matmul": flops / seconds / 1e9 / ceilings["matmul_gflops"],
        "decode_step_seconds": step,
        "decoder_weight_bytes": weight_bytes,
        "weight_stream_seconds": ideal,
        "decode_step_over_weight_stream": step / ideal,
    }


def _decode_step_seconds(
    model, ids, pad, features, chunk: int, static: bool, steps: int = 16
) -> float:
    """Seconds per batch-1 decode step, pipelined as ``generate_batch`` runs it, after a
    prefill of the padded prompt ``ids`` in ``chunk``-position calls (static shapes if
    ``static``)."""
    cache = make_cache(len(model.layers), static)
    for c in cache:
        c.reserve(ids.shape[1] + 2 * steps + 1)
    logits = prefill(model, ids, pad, cache, features, chunk)
    token = mx.argmax(logits, axis=-1)
    for k in range(2 * steps):  # the first half warms up
        if k == steps:
            mx.eval(token)
            start = time.perf_counter()
        following = mx.argmax(decode_step(model, token, pad, cache), axis=-1)
        mx.async_eval(following)
        token.tolist()
        token = following
    token.tolist()
    return (time.perf_counter() - start) / steps
