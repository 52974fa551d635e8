"""Attention and activations that are fast on the CPU as well as on a GPU.

MLX's CPU backend computes ``exp`` one element at a time (14-25 ns each on the 2-core x86 machine
this was measured on, against under 1 ns for a multiply), and ``scaled_dot_product_attention`` on
the CPU is a plain softmax over full score matrices. For a Phi-3-V prompt that exponent is most of
the prefill: softmax over the scores and the sigmoids of SiLU / quick-GELU. On the CPU, float32
arrays therefore take an ``exp`` built from multiplies and adds (range reduction to ``2**n * 2**f``,
a degree-6 polynomial for ``2**f``, ``2**n`` written into the exponent bits) that ``mx.compile``
fuses into a few loops (2-4 ns per element); attention there is matmuls plus that softmax,
normalised after ``@ V``, in blocks of queries that skip keys a causal mask hides. Measured on the
small bench preset's longest prompt (975 tokens): prefill 1.23 s -> 0.40-0.45 s, vision tower on
5 crops 1.03 s -> 0.33 s (with ``jobrunner._blas.tune_allocator``). The mask is added to the
scores as 0 / -inf (``attention_bias``, once per forward pass) rather than applied with ``where``,
which costs 5x an add here (same bits; about 1% of vision and prefill on the bench's rows).
Everything else (GPU, float16/bfloat16) takes MLX's own kernels.

Every operation here is elementwise or row-wise, so a row's result never depends on its batch.
Gradients are written out (the demo model trains through these functions). Where no C++ compiler
is available, MLX runs compiled functions unfused: slower, same results.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_ROUND = 12582912.0  # 1.5 * 2**23: adding it rounds a float32 of magnitude < 2**22 to an integer
_ROUND_BITS = 0x4B400000  # the bit pattern of _ROUND; a rounded sum's bits minus it = the integer


# exp(x) = 2**t, t = x * log2(e) = n + f with n = round(t), |f| <= 1/2, as 2**n (exponent bits)
# times a degree-6 polynomial in g = f * ln(2) (|g| <= 0.347: Taylor to g**6 is within 2e-7); t is
# clamped to [-127, 127], so 2**-127 and below flush to 0. The work is split into four compiled
# functions because of how MLX fuses a compiled graph on the CPU: a ``view`` (the exponent bits)
# is never fused, chains deeper than 11 operations are cut, a node used in two fused sections is
# stored, and GCC does not vectorize a generated loop in which a clamp feeds more arithmetic.
# Written as one function, it ran as six kernels (5.1-5.6 ms on 2M floats); as these four,
# 3.9-4.0 ms, with the same bits out.


@mx.compile
def _exp_t(x: mx.array) -> mx.array:
    return mx.clip(x * _LOG2E, -127.0, 127.0)


@mx.compile
def _exp_t_neg(x: mx.array) -> mx.array:  # for exp(-x)
    return mx.clip(-x * _LOG2E, -127.0, 127.0)


@mx.compile
def _exp_t_gelu(x: mx.array) -> mx.array:  # for exp(-1.702 x)
    return mx.clip(-1.702 * x * _LOG2E, -127.0, 127.0)


@mx.compile
def _exp_power(t: mx.array) -> mx.array:
    """2**round(t) as float32 bits (int32)."""
    n = (t + _ROUND) - _ROUND
    return (n.astype(mx.int32) + 127) << 23


@mx.compile
def _exp_inner(t: mx.array) -> mx.array:
    """The polynomial's innermost terms; ``g`` is written (n - t) * -ln2, which is (t - n) * ln2
    bit for bit, and each Horner step as (inner * g + c), so that the fuser meets every use of
    ``g`` before ``g`` itself and keeps it in one kernel."""
    n = (t + _ROUND) - _ROUND
    g = (n - t) * -_LN2
    return ((g / 720 + 1 / 120) * g + 1 / 24) * g + 1 / 6


@mx.compile
def _exp_outer(t: mx.array, inner: mx.array, power: mx.array) -> mx.array:
    n = (t + _ROUND) - _ROUND
    g = (n - t) * -_LN2
    return ((((inner * g + 1 / 2) * g) + 1.0) * g + 1.0) * power


def _exp_of(t: mx.array) -> mx.array:
    """exp of ``t / log2(e)``, ``t`` from one of the ``_exp_t`` functions."""
    return _exp_outer(t, _exp_inner(t), mx.view(_exp_power(t), mx.float32))


def _exp_kernel(x: mx.array) -> mx.array:
    return _exp_of(_exp_t(x))


@mx.compile
def _reciprocal_one_plus(e: mx.array) -> mx.array:
    return 1.0 / (1.0 + e)


@mx.compile
def _swiglu_tail(gate: mx.array, up: mx.array, e: mx.array) -> mx.array:
    return gate * up / (1.0 + e)


@mx.compile
def _quick_gelu_tail(x: mx.array, e: mx.array) -> mx.array:
    return x / (1.0 + e)


def _sigmoid_kernel(x: mx.array) -> mx.array:
    return _reciprocal_one_plus(_exp_of(_exp_t_neg(x)))


def _swiglu_kernel(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu_tail(gate, up, _exp_of(_exp_t_neg(gate)))


def _quick_gelu_kernel(x: mx.array) -> mx.array:
    return _quick_gelu_tail(x, _exp_of(_exp_t_gelu(x)))


# The kernels' bit operations have no derivative in MLX; training (model/train_demo.py) runs
# through these, so each gets its gradient written out.


@mx.custom_function
def _exp_float32(x: mx.array) -> mx.array:
    return _exp_kernel(x)


@_exp_float32.vjp
def _exp_vjp(x, cotangent, output):
    return cotangent * output


@mx.custom_function
def _swiglu_float32(gate: mx.array, up: mx.array) -> mx.array:
    return _swiglu_kernel(gate, up)


@_swiglu_float32.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    s = _sigmoid_kernel(gate)
    return cotangent * up * s * (1.0 + gate * (1.0 - s)), cotangent * gate * s


@mx.custom_function
def _quick_gelu_float32(x: mx.array) -> mx.array:
    return _quick_gelu_kernel(x)


@_quick_gelu_float32.vjp
def _quick_gelu_vjp(x, cotangent, output):
    s = _sigmoid_kernel(1.702 * x)
    return cotangent * (s + 1.702 * x * s * (1.0 - s))


def _fast(x: mx.array) -> bool:
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu


def exp(x: mx.array) -> mx.array:
    """``exp(x)``; on the CPU in float32 within 4e-6 relative (6e-7 on [-10, 10]), and results
    below 2**-127 are 0."""
    return _exp_float32(x) if _fast(x) else mx.exp(x)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up``, Phi-3's MLP activation."""
    return _swiglu_float32(gate, up) if _fast(gate) else nn.silu(gate) * up


def quick_gelu(x: mx.array) -> mx.array:
    """``x * sigmoid(1.702 x)``, CLIP's activation."""
    return _quick_gelu_float32(x) if _fast(x) else x * mx.sigmoid(1.702 * x)


def attention_bias(mask: mx.array | None, like: mx.array) -> mx.array | None:
    """``mask`` (boolean, True where a query may see a key) in the form ``attention`` is fastest
    with for activations like ``like``: on the CPU in float32, 0 where a query may see a key and
    -inf where not, which attention adds to the scores. Adding leaves every visible score as it
    was, bit for bit, where MLX's ``where`` over the scores cost 3.2 ns an element on the 2-core
    machine (a broadcast add 0.6 ns). Elsewhere the mask is returned as it is. Convert once per
    forward pass, not once per layer."""
    if mask is None or mask.dtype != mx.bool_ or not _fast(like):
        return mask
    return mx.where(mask, mx.array(0.0, like.dtype), mx.array(-mx.inf, like.dtype))


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | None = None,
    causal: bool = False,
) -> mx.array:
    """``softmax(q k^T * scale, where mask) @ v`` for ``q`` ``[B, H, L, D]`` and ``k``/``v``
    ``[B, KV, S, D]`` (``H`` a multiple of ``KV``).

    Args:
        mask: broadcastable to ``[B, H, L, S]``: boolean, True where a query may see a key,
            or from ``attention_bias``; every query must see at least one key.
        causal: ``mask`` hides every key after a query's own position. On the CPU, each block
            of queries then skips the keys after the last key the block could see if the
            queries were the last ``L`` positions. Keys past the queries' positions (a static
            cache's unwritten slots, a growing cache's up to its next ``KEY_BLOCK``) stay
            correct, since the mask hides them, but cost work.
    """
    if not _fast(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    mask = attention_bias(mask, q)
    batch, heads, length, dim = q.shape
    keys = k.shape[2]
    # query heads sharing a key/value head form one group: [B, KV, H/KV, L, D]
    q = (q * scale).reshape(batch, k.shape[1], heads // k.shape[1], length, dim)
    # Many queries (prefill, vision): a column of ones after V makes one matmul give the
    # softmax's numerator and denominator. Few (decoding): copying V would cost more than the sum.
    sum_column = length > 2 * dim
    if sum_column:
        v = mx.concatenate([v, mx.ones((*v.shape[:-1], 1), dtype=v.dtype)], axis=-1)
    k, v = k[:, :, None], v[:, :, None]
    if mask is not None and mask.ndim == 4:
        mask = mask[:, :, None]
    # blocks of at most ~2M scores: fewer wasted future keys, and buffers small enough for
    # the allocator to reuse instead of mapping fresh pages
    block = max(16, _BLOCK_SCORES // (batch * heads * keys))
    out = []
    for start in range(0, length, block):
        end = min(start + block, length)
        seen = keys - length + end if causal else keys
        out.append(
            _softmax_attention(
                q[..., start:end, :],
                k[..., :seen, :],
                v[..., :seen, :],
                None if mask is None else mask[..., start:end, :seen],
                sum_column,
            )
        )
    out = out[0] if len(out) == 1 else mx.concatenate(out, axis=-2)
    return out.reshape(batch, heads, length, dim)


_BLOCK_SCORES = 1 << 21


def _softmax_attention(
    q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None, sum_column: bool
) -> mx.array:
    scores = q @ k.swapaxes(-1, -2)
    if mask is not None:  # additive (``attention_bias``)
        scores = scores + mask
    weights = _exp_float32(scores - scores.max(axis=-1, keepdims=True))
    if not sum_column:
        return (weights @ v) / weights.sum(axis=-1, keepdims=True)
    out = weights @ v  # v ends with a column of ones: the last column is the weights' sum
    return out[..., :-1] / out[..., -1:]
