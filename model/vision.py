"""The image side of Phi-3-V: CLIP vision tower, 2x2 patch merge, HD layout and projector.

Crops come in as NHWC float arrays holding only real crops (never the zero padding crops of the
reference processor). The HD layout (sub-crop map with newline separators, ``glb_GN``, global
map) is expressed as a gather index computed on the host by ``processing.image_feature_index``,
so the forward pass is a handful of batched ``mx`` operations whatever the crop grids are.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import ops
from .config import ModelConfig, VisionConfig


class ClipAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.scale = (dim // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, dim = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = ops.attention(q, k, v, self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dim))


class ClipMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc1(x)
        return self.fc2(ops.quick_gelu(h))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.self_attn = ClipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [ClipEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class ClipEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.class_embedding = mx.zeros((dim,))
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            dim,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=False,
        )
        self.position_embedding = nn.Embedding(config.grid_size**2 + 1, dim)

    def __call__(self, pixels: mx.array) -> mx.array:
        patches = self.patch_embedding(pixels)  # [N, g, g, C]
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        cls = mx.broadcast_to(self.class_embedding, (patches.shape[0], 1, patches.shape[-1]))
        x = mx.concatenate([cls.astype(patches.dtype), patches], axis=1)
        # called, not read as .weight: a quantized checkpoint may hold it packed
        return x + self.position_embedding(mx.arange(x.shape[1])).astype(x.dtype)


class ClipVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = ClipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def layers_used(self) -> int:
        """How many encoder layers produce hidden state ``layer_idx`` (23 of 24 for -2)."""
        idx = self.config.layer_idx
        n = self.config.num_hidden_layers
        return n + 1 + idx if idx < 0 else idx

    def __call__(self, pixels: mx.array) -> mx.array:
        """Hidden state ``layer_idx`` (no post-layernorm), ``[N, 1 + g*g, C]``."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers[: self.layers_used()]:
            x = layer(x)
        return x


class ClipVisionModel(nn.Module):
    """Wrapper whose only child keeps the Hugging Face weight names (``vision_model.*``)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.vision_model = ClipVisionTransformer(config)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.vision_model(pixels)


def merge_2x2(features: mx.array, grid: int) -> mx.array:
    """``[N, g*g, C]`` patches → ``[N, (g/2)^2, 4C]``; each cell concatenates its 2x2 patches
    row offset outer, column offset inner."""
    n, _, dim = features.shape
    half = grid // 2
    x = features.reshape(n, half, 2, half, 2, dim).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, half * half, 4 * dim)


class ImageEmbedding(nn.Module):
    """CLIP features of crops → projected image-slot embeddings in HD (``sub_glb``) order."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        vision = config.vision
        merged_dim = 4 * config.image_dim_out
        self.vision_config = vision
        self.img_processor = ClipVisionModel(vision)
        self.glb_GN = mx.zeros((1, 1, merged_dim))
        self.sub_GN = mx.zeros((1, 1, 1, merged_dim))
        self.img_projection = [
            nn.Linear(merged_dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        ]
        self.crops_encoded = 0  # instrumentation: how many crops went through the tower

    def encode_crops(self, crops: mx.array) -> mx.array:
        """Merged CLIP features ``[N, t*t, 4C]`` of crops ``[N, S, S, 3]``."""
        self.crops_encoded += crops.shape[0]
        dtype = self.img_processor.vision_model.pre_layrnorm.weight.dtype
        hidden = self.img_processor(crops.astype(dtype))
        return merge_2x2(hidden[:, 1:], self.vision_config.grid_size)

    def project(self, merged: mx.array, feature_index: mx.array) -> mx.array:
        """Lay out merged crop features in slot order and project them: ``[n_slots, hidden]``.

        Args:
            merged: ``[N, t*t, 4C]`` features of every crop of the batch, in crop order.
            feature_index: ``[n_slots]`` rows of the flat feature table; -1 is the newline
                separator ``sub_GN`` and -2 the global separator ``glb_GN``.
        """
        flat = merged.reshape(-1, merged.shape[-1])
        rows = flat.shape[0]
        table = mx.concatenate(
            [
                flat,
                self.sub_GN.reshape(1, -1).astype(flat.dtype),
                self.glb_GN.reshape(1, -1).astype(flat.dtype),
            ]
        )
        index = mx.where(
            feature_index == -1, rows, mx.where(feature_index == -2, rows + 1, feature_index)
        )
        x = table[index]
        for layer in self.img_projection:
            x = layer(x)
        return x
