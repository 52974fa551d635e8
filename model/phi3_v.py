"""The whole Phi-3-V model and ``sanitize``, the one place checkpoint tensors are adapted.

``Model.__call__`` takes token ids (negative ids are image slots), per-row positions, a mask and
the cache; image features come in already projected, in slot order. The model holds no state
between calls: the cache objects do.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import ops
from .cache import KVCache
from .config import ModelConfig
from .language import DecoderLayer, SuScaledRoPE
from .vision import ImageEmbedding


class Phi3VModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_embed_tokens = ImageEmbedding(config)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rope = SuScaledRoPE(config)

    def embed(self, input_ids: mx.array, image_features: mx.array | None) -> mx.array:
        """Text embeddings with image slots (ids < 0) overwritten, in order, by image features.

        As in the reference, features are assigned to slots purely by order over the flattened
        batch, so each row's slots must come in its images' order.
        """
        is_image = input_ids < 0
        h = self.embed_tokens(mx.maximum(input_ids, 0))
        if image_features is None:
            return h
        slot = mx.cumsum(is_image.reshape(-1).astype(mx.int32)) - 1
        slot = mx.clip(slot, 0, max(image_features.shape[0] - 1, 0)).reshape(input_ids.shape)
        return mx.where(is_image[..., None], image_features[slot].astype(h.dtype), h)

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        mask: mx.array | None,
        cache: list[KVCache] | None,
        image_features: mx.array | None = None,
        embeddings: mx.array | None = None,
        rope_span: mx.array | None = None,
    ) -> mx.array:
        h = self.embed(input_ids, image_features) if embeddings is None else embeddings
        rope = self.rope.tables(positions, rope_span)
        mask = ops.attention_bias(mask, h)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache[i] if cache is not None else None)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Phi3VModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def vision(self) -> ImageEmbedding:
        return self.model.vision_embed_tokens

    @property
    def layers(self) -> list:
        return self.model.layers

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        mask: mx.array | None = None,
        cache: list[KVCache] | None = None,
        image_features: mx.array | None = None,
        embeddings: mx.array | None = None,
        rope_span: mx.array | None = None,
    ) -> mx.array:
        """Logits ``[B, L, vocab]`` (float32).

        ``embeddings`` (from ``model.model.embed``) replaces ``input_ids``/``image_features``;
        chunked prefill uses it, since image slots are filled over the whole prompt at once.
        ``rope_span`` (``[B]``) is each row's whole prompt length when this call covers only part
        of it (``SuScaledRoPE.tables``).
        """
        h = self.model(input_ids, positions, mask, cache, image_features, embeddings, rope_span)
        return self.lm_head(h).astype(mx.float32)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Adapt original Microsoft or MLX-converted checkpoint tensors to this module tree."""
    out = {}
    for name, value in weights.items():
        # Buffers of the torch CLIP module, not parameters.
        if name.endswith(".position_ids"):
            continue
        # The reference vision module holds the text embedding too; it is the same tensor.
        if name == "model.vision_embed_tokens.wte.weight":
            out.setdefault("model.embed_tokens.weight", value)
            continue
        # torch conv weights are OIHW; MLX wants OHWI. Converted checkpoints already end in 3.
        if name.endswith("patch_embedding.weight") and value.ndim == 4 and value.shape[-1] != 3:
            value = value.transpose(0, 2, 3, 1)
        out[name] = value
    return out
