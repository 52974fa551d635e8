"""The CPU fast paths of model/ops.py against MLX's own kernels and numpy."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from model import ops
from model.language import attention_mask


@pytest.fixture(autouse=True)
def on_cpu():
    """The fast paths are the CPU's: on a machine with a GPU, these tests still run them."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def test_exp_matches_numpy_over_float32_range():
    x = mx.concatenate([mx.linspace(-87.0, 88.0, 200_001), mx.random.normal((10_000,)) * 5])
    expected = np.exp(np.array(x).astype(np.float64))
    got = np.array(ops.exp(x)).astype(np.float64)
    assert np.max(np.abs(got - expected) / expected) < 5e-6
    near = np.abs(np.array(x)) < 10  # the range attention and activations live in
    assert np.max(np.abs(got - expected)[near] / expected[near]) < 1e-6


def test_exp_limits():
    x = mx.array([-mx.inf, -1000.0, -100.0, 0.0, 1.0, 88.0])
    got = ops.exp(x).tolist()
    assert got[:3] == [0.0, 0.0, 0.0]  # underflow is exactly 0: masked keys weigh nothing
    assert got[3] == 1.0
    assert got[4] == pytest.approx(np.e, rel=1e-6)
    assert got[5] == pytest.approx(np.exp(88.0), rel=1e-5)
    assert np.isnan(ops.exp(mx.array([np.nan])).item())


def _exp_as_one_expression(x):
    """The exp's arithmetic written as one expression, as it was before it was split into
    kernels for MLX's fuser: the split must not change a bit."""
    t = mx.clip(x * ops._LOG2E, -127.0, 127.0)
    shifted = t + ops._ROUND
    n = shifted - ops._ROUND
    g = (t - n) * ops._LN2
    p = 1.0 + g * (1.0 + g * (1 / 2 + g * (1 / 6 + g * (1 / 24 + g * (1 / 120 + g / 720)))))
    power = (mx.view(shifted, mx.int32) - ops._ROUND_BITS + 127) << 23
    return p * mx.view(power, mx.float32)


def test_exp_and_activations_are_the_one_expression_bit_for_bit():
    x = mx.concatenate(
        [mx.linspace(-200.0, 100.0, 300_001), mx.array([mx.inf, -mx.inf, 0.0, -0.0, 88.7])]
    )
    y = mx.random.normal(x.shape, key=mx.random.key(3)) * 4

    def bits(a):
        return np.array(a).view(np.int32)

    one = _exp_as_one_expression
    assert np.array_equal(bits(ops.exp(x)), bits(one(x)))
    assert np.array_equal(bits(ops.swiglu(x, y)), bits(x * y / (1.0 + one(-x))))
    assert np.array_equal(bits(ops.quick_gelu(x)), bits(x / (1.0 + one(-1.702 * x))))
    assert np.array_equal(bits(ops._sigmoid_kernel(x)), bits(1.0 / (1.0 + one(-x))))


def test_activations_match_mlx():
    x = mx.random.normal((64, 300), key=mx.random.key(1)) * 6
    y = mx.random.normal((64, 300), key=mx.random.key(2))
    assert mx.allclose(ops.swiglu(x, y), nn.silu(x) * y, rtol=1e-5, atol=1e-6).item()
    assert mx.allclose(ops.quick_gelu(x), x * mx.sigmoid(1.702 * x), rtol=1e-5, atol=1e-6).item()
    huge = mx.array([-200.0, 200.0])
    assert ops.swiglu(huge, mx.ones(2)).tolist() == pytest.approx([0.0, 200.0], abs=1e-30)


def _reference(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("block_scores", [1 << 21, 64])  # one block; blocks of 16 queries
def test_causal_attention_with_padding_and_cache_offset(kv_heads, block_scores, monkeypatch):
    monkeypatch.setattr(ops, "_BLOCK_SCORES", block_scores)
    batch, heads, offset, length, dim = 3, 4, 37, 53, 16
    keys = offset + length
    rng = [mx.random.key(s) for s in range(3)]
    q = mx.random.normal((batch, heads, length, dim), key=rng[0])
    k = mx.random.normal((batch, kv_heads, keys, dim), key=rng[1])
    v = mx.random.normal((batch, kv_heads, keys, dim), key=rng[2])
    pad = mx.array([0, 5, 60])  # the last row's padding reaches into this chunk
    mask = attention_mask(pad, offset, length)
    got = ops.attention(q, k, v, 0.25, mask, causal=True)
    assert mx.allclose(got, _reference(q, k, v, 0.25, mask), rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("length", [1, 5, 40])  # decoding, a short chunk, a long one
def test_attention_both_ways_of_normalising(length):
    keys = 30 + length
    q = mx.random.normal((2, 4, length, 16), key=mx.random.key(5))
    k, v = (mx.random.normal((2, 4, keys, 16), key=mx.random.key(s)) for s in (6, 7))
    mask = attention_mask(mx.array([0, 7]), keys - length, length)
    got = ops.attention(q, k, v, 0.25, mask, causal=True)
    assert mx.allclose(got, _reference(q, k, v, 0.25, mask), rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("length", [1, 40])
def test_additive_mask_is_the_boolean_one_bit_for_bit(length):
    """The model converts its mask once per pass (``attention_bias``); the result must be what
    the boolean mask gives, and what hiding the scores with ``where`` gave, bit for bit."""
    keys = 30 + length
    q = mx.random.normal((2, 4, length, 16), key=mx.random.key(8))
    k, v = (mx.random.normal((2, 4, keys, 16), key=mx.random.key(s)) for s in (9, 10))
    mask = attention_mask(mx.array([0, 7]), keys - length, length)
    bias = ops.attention_bias(mask, q)
    assert bias.dtype == mx.float32
    assert set(np.unique(np.array(bias)).tolist()) == {0.0, -np.inf}
    got = ops.attention(q, k, v, 0.25, bias, causal=True)
    assert mx.array_equal(got, ops.attention(q, k, v, 0.25, mask, causal=True)).item()
    # the formula with ``where``, as it was before the additive mask
    scores = (q * 0.25) @ k.swapaxes(-1, -2)
    scores = mx.where(mask, scores, -mx.inf)
    weights = ops.exp(scores - scores.max(axis=-1, keepdims=True))
    if length > 32:  # sum column: the denominator comes out of the same matmul
        ones = mx.concatenate([v, mx.ones((*v.shape[:-1], 1))], axis=-1)
        out = weights @ ones
        expected = out[..., :-1] / out[..., -1:]
    else:
        expected = (weights @ v) / weights.sum(axis=-1, keepdims=True)
    assert mx.array_equal(got, expected).item()
    half = q.astype(mx.bfloat16)
    assert ops.attention_bias(mask, half) is mask  # MLX's kernels take the boolean mask


def test_unmasked_attention_in_blocks(monkeypatch):
    monkeypatch.setattr(ops, "_BLOCK_SCORES", 500)
    q, k, v = (mx.random.normal((2, 3, 41, 8), key=mx.random.key(s)) for s in range(3))
    got = ops.attention(q, k, v, 0.3)
    assert mx.allclose(got, _reference(q, k, v, 0.3, None), rtol=1e-5, atol=1e-5).item()


def test_a_row_does_not_depend_on_its_batch():
    q, k, v = (mx.random.normal((4, 2, 30, 8), key=mx.random.key(s)) for s in range(3))
    batched = ops.attention(q, k, v, 0.3)
    alone = ops.attention(q[2:3], k[2:3], v[2:3], 0.3)
    assert mx.array_equal(batched[2:3], alone).item()


def test_half_precision_takes_mlx_kernels():
    x = (mx.random.normal((8, 8)) * 3).astype(mx.float16)
    assert mx.array_equal(ops.exp(x), mx.exp(x)).item()
    q = mx.random.normal((1, 2, 5, 8)).astype(mx.bfloat16)
    assert mx.array_equal(ops.attention(q, q, q, 0.3), _reference(q, q, q, 0.3, None)).item()


def test_gradients_match_mlx():
    """The demo model trains through these ops on the CPU: their gradients must be right."""
    x = mx.random.normal((64,), key=mx.random.key(3)) * 4
    y = mx.random.normal((64,), key=mx.random.key(4))

    def close(a, b):
        return mx.allclose(a, b, rtol=1e-5, atol=1e-6).item()

    assert close(mx.grad(lambda a: ops.exp(a).sum())(x), mx.exp(x))
    got = mx.grad(lambda a, b: ops.swiglu(a, b).sum(), argnums=(0, 1))(x, y)
    want = mx.grad(lambda a, b: (nn.silu(a) * b).sum(), argnums=(0, 1))(x, y)
    assert all(close(g, w) for g, w in zip(got, want, strict=True))
    got = mx.grad(lambda a: ops.quick_gelu(a).sum())(x)
    assert close(got, mx.grad(lambda a: (a * mx.sigmoid(1.702 * a)).sum())(x))

    q, k, v = (mx.random.normal((2, 4, 9, 8), key=mx.random.key(s)) for s in range(3))
    mask = attention_mask(mx.array([0, 3]), 0, 9)

    def reference(q, k, v):
        scores = mx.where(mask, (q * 0.3) @ k.swapaxes(-1, -2), -mx.inf)
        return (mx.softmax(scores, axis=-1) @ v).sum()

    def fast(q, k, v):
        return ops.attention(q, k, v, 0.3, mask, causal=True).sum()

    got = mx.grad(fast, argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(reference, argnums=(0, 1, 2))(q, k, v)
    assert all(close(g, w) for g, w in zip(got, want, strict=True))
