"""Configuration of Phi-3-Vision / Phi-3.5-vision, read from a Hugging Face ``config.json``.

Field names follow the Hugging Face config. ``from_dict`` ignores keys it does not know and
``__post_init__`` raises ``ValueError`` (naming the field) for values the model cannot serve.

The CLIP tower is hard-coded to ViT-L/14-336 in the reference code; small test models may override
it with ``img_processor.vision_config`` (CLIP field names), in which case ``image_dim_out`` equals
that ``hidden_size``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any


def _known_fields(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    names = inspect.signature(cls).parameters
    return {k: v for k, v in params.items() if k in names}


@dataclass
class VisionConfig:
    """The CLIP vision tower (defaults: openai/clip-vit-large-patch14-336)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    layer_idx: int = -2

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> VisionConfig:
        return cls(**_known_fields(cls, params))

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                "vision_config.num_attention_heads must divide vision_config.hidden_size "
                f"({self.num_attention_heads} does not divide {self.hidden_size})"
            )
        if self.image_size % self.patch_size:
            raise ValueError("vision_config.patch_size must divide vision_config.image_size")
        if (self.image_size // self.patch_size) % 2:
            raise ValueError(
                "vision_config.image_size / patch_size must be even (the 2x2 patch merge needs it)"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side of one crop."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        """Merged (2x2) feature cells per side of one crop: 12 for ViT-L/14-336."""
        return self.grid_size // 2


@dataclass
class ModelConfig:
    """The whole Phi-3-V model: the Phi-3 decoder plus image embedding settings."""

    hidden_size: int = 3072
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_size: int = 8192
    vocab_size: int = 32064
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "phi3_v"
    embd_layer: dict[str, Any] = field(default_factory=dict)
    img_processor: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelConfig:
        return cls(**_known_fields(cls, params))

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ValueError("hidden_size / num_attention_heads must be even for rotary embeddings")
        self._check_rope_scaling()
        self._check_embedding()
        self.vision = VisionConfig.from_dict(
            {"layer_idx": self.img_processor.get("layer_idx", -2)}
            | dict(self.img_processor.get("vision_config") or {})
        )
        if self.image_dim_out != self.vision.hidden_size:
            raise ValueError(
                f"img_processor.image_dim_out ({self.image_dim_out}) must equal the vision "
                f"tower's hidden_size ({self.vision.hidden_size})"
            )

    def _check_rope_scaling(self):
        if self.rope_scaling is None:
            return
        kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
        if kind not in ("su", "longrope"):
            raise ValueError(f"rope_scaling.type must be 'su' or 'longrope', got {kind!r}")
        half = self.head_dim // 2
        for key in ("short_factor", "long_factor"):
            factors = self.rope_scaling.get(key)
            if not isinstance(factors, list) or len(factors) != half:
                raise ValueError(f"rope_scaling.{key} must be a list of head_dim/2 = {half} floats")

    def _check_embedding(self):
        if self.embd_layer.get("hd_transform_order", "sub_glb") != "sub_glb":
            raise ValueError("embd_layer.hd_transform_order: only 'sub_glb' is supported")
        if self.img_processor.get("type_feature", "patch") != "patch":
            raise ValueError("img_processor.type_feature: only 'patch' is supported")
        if not self.embd_layer.get("use_hd_transform", True):
            raise ValueError("embd_layer.use_hd_transform: only the HD transform is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_dim_out(self) -> int:
        vision = self.img_processor.get("vision_config") or {}
        return int(self.img_processor.get("image_dim_out", vision.get("hidden_size", 1024)))

    @property
    def rope_mscale(self) -> float:
        """Multiplier of cos/sin in su/longrope: sqrt(1 + ln(s) / ln(original_max))."""
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        if self.rope_scaling is None or scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)
