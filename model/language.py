"""The Phi-3 decoder: su/longrope rotary embeddings, attention, MLP and the decoder layer.

Every call takes per-row position ids ``[B, L]`` and an attention mask, so left-padded rows of
different lengths share one batch and each row sees exactly what it would see alone.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import ops
from .cache import KVCache
from .config import ModelConfig


class SuScaledRoPE(nn.Module):
    """Rotate-half RoPE with Phi-3's short/long per-frequency factors and cos/sin scaling.

    Like the reference, the long factors apply when the sequence a forward call covers is longer
    than ``original_max_position_embeddings``: the whole prompt for a prompt's pass (even when it
    runs in chunks, or in two parts), the position reached for a decoding step. The choice is made
    per row, so a row's encoding never depends on the other rows of its batch.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.head_dim
        exponents = mx.arange(0, dim, 2, dtype=mx.float32) / dim
        base_inv = 1.0 / (config.rope_theta**exponents)
        scaling = config.rope_scaling or {}
        short = mx.array(scaling.get("short_factor", [1.0] * (dim // 2)), dtype=mx.float32)
        long = mx.array(scaling.get("long_factor", [1.0] * (dim // 2)), dtype=mx.float32)
        self._short_inv = base_inv / short
        self._long_inv = base_inv / long
        self._switch = config.original_max_position_embeddings if config.rope_scaling else None
        self.mscale = config.rope_mscale

    def is_long(self, length: int) -> bool:
        """Whether a sequence of ``length`` positions takes the long factors."""
        return self._switch is not None and length > self._switch

    def tables(
        self, positions: mx.array, span: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        """cos/sin tables ``[B, 1, L, D/2]`` (float32) for integer ``positions`` ``[B, L]``.

        ``span`` ``[B]``: the length of each row's sequence that the factors are chosen for (its
        whole prompt, when ``positions`` are a chunk of it); default: up to the last position.
        """
        if self._switch is None:
            inv = mx.broadcast_to(self._short_inv, (positions.shape[0], self._short_inv.shape[0]))
        else:
            if span is None:
                span = positions.max(axis=1) + 1
            use_long = span[:, None] > self._switch
            inv = mx.where(use_long, self._long_inv[None], self._short_inv[None])
        angles = positions.astype(mx.float32)[:, :, None] * inv[:, None, :]
        return (mx.cos(angles) * self.mscale)[:, None], (mx.sin(angles) * self.mscale)[:, None]

    @staticmethod
    def apply(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        half = x.shape[-1] // 2
        x1 = x[..., :half].astype(mx.float32)
        x2 = x[..., half:].astype(mx.float32)
        rotated = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return rotated.astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def __call__(
        self,
        x: mx.array,
        rope: tuple[mx.array, mx.array],
        mask: mx.array | None,
        cache: KVCache | None,
    ) -> mx.array:
        batch, length, _ = x.shape
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        q = qkv[..., :q_size].reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = qkv[..., q_size : q_size + kv_size]
        v = qkv[..., q_size + kv_size :]
        k = k.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = SuScaledRoPE.apply(q, *rope)
        k = SuScaledRoPE.apply(k, *rope)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = ops.attention(q, k, v, self.scale, mask, causal=True)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(ops.swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        rope: tuple[mx.array, mx.array],
        mask: mx.array | None,
        cache: KVCache | None,
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask(pad: mx.array, offset: int, length: int, keys: int | None = None) -> mx.array:
    """Boolean mask ``[B, 1, length, keys]`` for left-padded rows.

    Query ``i`` (absolute position ``offset + i``) sees key ``j`` when ``j`` is not in the future
    and is not padding (``j >= pad[b]``). A padding query also sees itself, so no softmax row is
    empty; padding outputs are never read. ``keys`` defaults to ``offset + length``; more keys
    (a static cache's whole buffer) are future positions, hidden.
    """
    keys = offset + length if keys is None else keys
    q_pos = mx.arange(offset, offset + length)[:, None]
    k_pos = mx.arange(keys)[None, :]
    causal = k_pos <= q_pos
    not_pad = k_pos[None] >= pad[:, None, None]
    return (causal[None] & (not_pad | (k_pos == q_pos)[None]))[:, None]


def position_ids(pad: mx.array, offset: int, length: int) -> mx.array:
    """Per-row positions ``[B, length]``: 0 at each row's first real token, 0 on padding."""
    absolute = mx.arange(offset, offset + length)[None, :]
    return mx.maximum(absolute - pad[:, None], 0)
