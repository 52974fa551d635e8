"""The transformers reference models (torch, CPU, float32) built from a tiny config and weights.

``Phi3ForCausalLM`` and ``CLIPVisionModel`` load the checkpoint tensors strictly, so they both
prove the names/shapes are the real ones and serve as the parity reference.
"""

from __future__ import annotations

import numpy as np

CLIP_PREFIX = "model.vision_embed_tokens.img_processor.vision_model."


def _longrope_settings(transformers, config: dict, rope: dict) -> dict:
    """Phi3Config's LongRoPE settings in the form the installed transformers reads.

    transformers 5 takes ``rope_parameters``; transformers 4 (the pyproject allows >=4.45) takes
    ``rope_theta`` and ``rope_scaling`` and keeps an unknown ``rope_parameters`` as a plain
    attribute, so the reference would run without the short/long factors at all.
    """
    factors = {"short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": config["rope_theta"],
                **factors,
                "original_max_position_embeddings": config["original_max_position_embeddings"],
            }
        }
    return {"rope_theta": config["rope_theta"], "rope_scaling": {"type": "longrope", **factors}}


def torch_phi3(config: dict, weights: dict[str, np.ndarray]):
    import torch
    import transformers

    rope = config["rope_scaling"]
    torch_config = transformers.Phi3Config(
        **{
            k: config.get(k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "rms_norm_eps",
                "max_position_embeddings",
                "original_max_position_embeddings",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
            )
        },
        **_longrope_settings(transformers, config, rope),
        tie_word_embeddings=False,
    )
    torch_config._attn_implementation = "eager"
    model = transformers.Phi3ForCausalLM(torch_config).eval()
    text = {k: torch.from_numpy(v) for k, v in weights.items() if not k.startswith("model.vision")}
    model.load_state_dict(text, strict=True)
    return model


def torch_clip(config: dict, weights: dict[str, np.ndarray]):
    import torch
    import transformers

    vision = config["img_processor"]["vision_config"]
    names = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"]
    torch_config = transformers.CLIPVisionConfig(
        **{k: vision[k] for k in names + ["image_size", "patch_size"]},
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
        hidden_act="quick_gelu",
    )
    torch_config._attn_implementation = "eager"
    model = transformers.CLIPVisionModel(torch_config).eval()
    # transformers 5 dropped CLIPVisionModel's ``vision_model`` level that checkpoints keep.
    prefix = CLIP_PREFIX[: -len("vision_model.")] if hasattr(model, "vision_model") else CLIP_PREFIX
    state = {
        k[len(prefix) :]: torch.from_numpy(v) for k, v in weights.items() if k.startswith(prefix)
    }
    model.load_state_dict(state, strict=True)
    return model
