"""Tiny random-weight Phi-3-V checkpoints in the real Hugging Face layout.

Used by the tests, ``jobrunner bench`` and ``make demo``: nothing is downloaded, everything is
deterministic given the seed. A tiny model directory holds exactly what a real one does
(PHI3V.md sections 1, 2 and 6; DESIGN.md "Model directory"):

- ``config.json``: a full ``phi3_v`` config with small dimensions; ``img_processor.vision_config``
  carries the (small) CLIP tower with CLIP field names.
- ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``,
  every tensor of PHI3V.md section 2 with its real name and PyTorch shape (the unused last CLIP
  layer and ``post_layernorm`` included).
- ``preprocessor_config.json``, ``generation_config.json`` and the tokenizer files.

Layouts: ``hf`` (PyTorch shapes, like the Microsoft checkpoints; optionally with the old
``position_ids`` buffer), ``mlx`` (patch conv as OHWI, no ``position_ids``, ``{"format": "mlx"}``
metadata, like mlx-community conversions) and ``mlx-q4`` (``mlx`` plus 4-bit affine quantization of
the decoder linears, with ``config["quantization"]``).

The tokenizer is a byte-level BPE trained on a small built-in English corpus. Its special tokens
have fixed low ids (``SPECIAL_TOKENS``) and ``encode`` prepends ``<s>`` like the Phi-3 tokenizer.

Weights are drawn so that activations stay O(1) through both towers and the logits are well
spread: greedy decoding from a tiny model gives varied tokens, and top-1 / top-2 logits are rarely
close enough for float rounding (batched vs alone) to flip them.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|system|>",
    "<|image|>",
    "<|placeholder|>",
)
"""Special tokens; each one's id is its index here (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ...)."""

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

Layout = Literal["hf", "mlx", "mlx-q4"]

_VISION = "model.vision_embed_tokens."
_CLIP = _VISION + "img_processor.vision_model."
_POSITION_IDS = _CLIP + "embeddings.position_ids"
_QUANTIZED = re.compile(
    r"^(model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)|lm_head)\.weight$"
)

# ---------------------------------------------------------------------------------------------
# Tokenizer


def _corpus() -> list[str]:
    """A small deterministic English corpus: captions, questions and answers, digits."""
    colours = "red green blue yellow orange purple pink brown black white gray cyan".split()
    shapes = "circle square triangle rectangle star line dot ellipse hexagon cross".split()
    sizes = "small large big tiny medium huge".split()
    places = (
        "on the left|on the right|at the top|at the bottom|in the center|in the top left corner|"
        "next to the|above the|below the|behind the"
    ).split("|")
    lines = []
    for k, (colour, shape) in enumerate(itertools.product(colours, shapes)):
        size, place = sizes[k % len(sizes)], places[k % len(places)]
        other = colours[(k * 5 + 3) % len(colours)]
        lines.append(f"a {size} {colour} {shape} {place} on a {other} background")
        lines.append(f"What colour is the {shape}? The {shape} is {colour}.")
        lines.append(f"Is there a {colour} {shape} in the image? Yes, there is one {place}.")
    for n in range(13):
        lines.append(f"How many shapes are there? There are {n} shapes in the picture.")
    lines += [
        "Describe the image in detail.",
        "The picture shows a photo of a cat sitting on a wooden table near a window.",
        "A man is riding a bicycle down a quiet street in the morning.",
        "Two dogs are playing with a ball in the park while people watch.",
        "This is a chart with numbers, labels and a title.",
        "Answer the question with a short sentence. Write a caption for this image.",
        "The quick brown fox jumps over the lazy dog.",
        "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90 100 1000 2024 3.14 42%",
    ]
    return lines


def build_tokenizer(out_dir: Path, corpus: list[str] | None = None, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer and save it with transformers into ``out_dir``.

    Args:
        out_dir: folder for ``tokenizer.json`` and ``tokenizer_config.json`` (created if missing).
        corpus: extra training text, added to the built-in corpus.
        vocab_size: the most tokens, special tokens and the 256 byte tokens included.

    Returns:
        The ``PreTrainedTokenizerFast`` that ``AutoTokenizer.from_pretrained(out_dir)`` reloads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus() + list(corpus or []), trainer=trainer)
    # Like the Phi-3 (Llama) tokenizer: every encode starts with <s>, no </s> at the end.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        # transformers 4's name: 4.47-4.57 take extra_special_tokens as a dict only (a list
        # fails every load); 5 reads this one as its extra_special_tokens.
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
    )
    tokenizer.save_pretrained(str(out_dir))
    _portable_tokenizer_class(Path(out_dir) / "tokenizer_config.json")
    return tokenizer


# Phi-3-V's template (../shared/PHI3V.md, section 6): each message as <|role|>\n...<|end|>\n,
# then <|assistant|>\n; the tokenizer adds <s>. Tools that format prompts from the checkpoint's
# template (mlx-vlm) then see the prompts jobrunner builds.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] "
    "+ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
    "'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)


def _portable_tokenizer_class(path: Path) -> None:
    # transformers 5 writes "TokenizersBackend", which transformers 4 does not know; both
    # resolve "PreTrainedTokenizerFast".
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # transformers 5 writes the special tokens as an extra_special_tokens list, which 4.47-4.57
    # fail to load ('list' object has no attribute 'keys', shown as a protobuf ImportError);
    # additional_special_tokens is read by 4 and 5 alike.
    extra = tokenizer_config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        tokenizer_config["additional_special_tokens"] = extra
    elif extra:
        tokenizer_config["extra_special_tokens"] = extra
    tokenizer_config.setdefault("add_bos_token", True)
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Config


def _rope_factors(half: int) -> tuple[list[float], list[float]]:
    """Deterministic su/longrope factors shaped like the real ones (short ~1..3, long ~1..60)."""
    ramp = np.linspace(0.0, 1.0, half)
    short = 1.0 + 2.0 * ramp**2
    long = np.exp(np.log(60.0) * ramp**1.5)
    return [round(float(f), 6) for f in short], [round(float(f), 6) for f in long]


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``overrides``, merging nested dicts key by key."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A ``phi3_v`` config.json dict with tiny dimensions.

    Args:
        overrides: config keys to replace; dict values merge into the nested dicts, e.g.
            ``img_processor=dict(vision_config=dict(num_hidden_layers=4))``, or the shortcut
            ``vision_config=dict(...)``. Fields derived from the dimensions (RoPE factors,
            ``image_dim_out``, ``num_img_tokens``) follow them unless overridden themselves.

    Returns:
        The config dict, ready for ``json.dump`` and ``ModelConfig.from_dict``.
    """
    overrides = dict(overrides)
    if "vision_config" in overrides:
        vision = {"vision_config": overrides.pop("vision_config")}
        overrides["img_processor"] = _merge(overrides.get("img_processor", {}), vision)
    config = _merge(_base_config(), overrides)
    heads = config["num_attention_heads"]
    config.setdefault("num_key_value_heads", heads)
    short, long = _rope_factors(config["hidden_size"] // heads // 2)
    rope = config["rope_scaling"]
    if rope is not None:
        rope.setdefault("short_factor", short)
        rope.setdefault("long_factor", long)
    processor, vision = config["img_processor"], config["img_processor"]["vision_config"]
    processor.setdefault("image_dim_out", vision["hidden_size"])
    processor.setdefault("num_img_tokens", (vision["image_size"] // vision["patch_size"] // 2) ** 2)
    return config


def _base_config() -> dict[str, Any]:
    return {
        "_name_or_path": "jobrunner/tiny-random-phi3-v",
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "su"},
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "sliding_window": 131072,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
        "torch_dtype": "float32",
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "img_processor": {
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 3,
                "image_size": 56,
                "patch_size": 14,
                "num_channels": 3,
                "layer_norm_eps": 1e-5,
                "hidden_act": "quick_gelu",
            },
        },
    }


# ---------------------------------------------------------------------------------------------
# Weights


def weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Phi-3-V checkpoint (PHI3V.md section 2): name -> PyTorch shape."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv_heads) * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes.update(_vision_shapes(config))
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _vision_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    vision = config["img_processor"]["vision_config"]
    width, mlp, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    channels = vision.get("num_channels", 3)
    positions = (vision["image_size"] // patch) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        _CLIP + "embeddings.class_embedding": (width,),
        _CLIP + "embeddings.patch_embedding.weight": (width, channels, patch, patch),
        _CLIP + "embeddings.position_embedding.weight": (positions, width),
        _CLIP + "pre_layrnorm.weight": (width,),
        _CLIP + "pre_layrnorm.bias": (width,),
    }
    linears = {f"self_attn.{n}_proj": (width, width) for n in ("q", "k", "v", "out")}
    linears.update({"mlp.fc1": (mlp, width), "mlp.fc2": (width, mlp)})
    for layer in range(vision["num_hidden_layers"]):  # all layers, the unused last one too
        p = f"{_CLIP}encoder.layers.{layer}."
        for name, shape in linears.items():
            shapes[f"{p}{name}.weight"], shapes[f"{p}{name}.bias"] = shape, shape[:1]
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"], shapes[f"{p}{norm}.bias"] = (width,), (width,)
    shapes[_CLIP + "post_layernorm.weight"] = (width,)
    shapes[_CLIP + "post_layernorm.bias"] = (width,)
    hidden = config["hidden_size"]
    shapes[_VISION + "glb_GN"] = (1, 1, 4 * width)
    shapes[_VISION + "sub_GN"] = (1, 1, 1, 4 * width)
    shapes[_VISION + "img_projection.0.weight"] = (hidden, 4 * width)
    shapes[_VISION + "img_projection.0.bias"] = (hidden,)
    shapes[_VISION + "img_projection.2.weight"] = (hidden, hidden)
    shapes[_VISION + "img_projection.2.bias"] = (hidden,)
    return shapes


def _init_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the normal a tensor is drawn from, chosen to keep activations O(1)."""
    if len(shape) == 1 and re.search(r"(norm\d?|layrnorm)\.weight$", name):
        return 1.0, 0.05  # norm gains near one
    if name.endswith(".bias"):
        return 0.0, 0.02
    if name.endswith(("embed_tokens.weight", "class_embedding", "_GN")):
        return 0.0, 1.0  # same scale as the normalised activations they sit next to
    if name.endswith("position_embedding.weight"):
        return 0.0, 0.5
    if name == "lm_head.weight":
        return 0.0, 3.0 / math.sqrt(shape[1])  # logits with std ~3: a clear top-1
    fan_in = math.prod(shape[1:])
    return 0.0, 1.0 / math.sqrt(fan_in)


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with the Hugging Face names and PyTorch shapes.

    Args:
        config: a config dict (``tiny_config()``).
        seed: seed of the ``numpy.random.Generator``; same seed, same weights.

    Returns:
        name -> array, in checkpoint order (decoder, vision tower, ``lm_head``).
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(config).items():
        mean, std = _init_std(name, shape)
        weights[name] = (mean + std * rng.standard_normal(shape)).astype(np.float32)
    return weights


# ---------------------------------------------------------------------------------------------
# Saving


def _to_layout(
    weights: dict[str, np.ndarray], layout: Layout, with_position_ids: bool
) -> dict[str, np.ndarray]:
    tensors = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    conv = _CLIP + "embeddings.patch_embedding.weight"
    if layout == "hf":
        if with_position_ids:  # the buffer old HF CLIP checkpoints carried; loaders drop it
            n = weights[_CLIP + "embeddings.position_embedding.weight"].shape[0]
            tensors[_POSITION_IDS] = np.arange(n, dtype=np.int64)[None]
        return tensors
    tensors[conv] = np.ascontiguousarray(tensors[conv].transpose(0, 2, 3, 1))  # OIHW -> OHWI
    if layout == "mlx-q4":
        tensors = quantize_weights(tensors, group_size=64, bits=4)
    elif layout != "mlx":
        raise ValueError(f"layout must be 'hf', 'mlx' or 'mlx-q4', got {layout!r}")
    return tensors


def quantize_weights(
    weights: dict[str, np.ndarray], group_size: int = 64, bits: int = 4
) -> dict[str, np.ndarray]:
    """Affine-quantize the decoder linears (and ``lm_head``) the way MLX conversions store them.

    Each quantized ``<path>.weight`` becomes packed ``uint32`` plus ``<path>.scales`` and
    ``<path>.biases``; layers whose input width is not a multiple of ``group_size`` stay float.
    """
    import mlx.core as mx

    out = {}
    for name, value in weights.items():
        if not _QUANTIZED.match(name) or value.shape[-1] % group_size:
            out[name] = value
            continue
        packed, scales, biases = mx.quantize(mx.array(value), group_size=group_size, bits=bits)
        path = name[: -len(".weight")]
        out[name] = np.array(packed)
        out[path + ".scales"] = np.array(scales)
        out[path + ".biases"] = np.array(biases)
    return out


def _write_safetensors(
    out_dir: Path, tensors: dict[str, np.ndarray], shards: int, metadata: dict[str, str]
) -> None:
    from safetensors.numpy import save_file

    if shards == 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata=metadata)
        return
    names = list(tensors)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be between 1 and {len(names)}, got {shards}")
    weight_map = {}
    for k, part in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
        filename = f"model-{k:05d}-of-{shards:05d}.safetensors"
        chunk = {names[i]: tensors[names[i]] for i in part}
        save_file(chunk, str(out_dir / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(chunk, filename))
    total = sum(int(t.nbytes) for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out_dir / "model.safetensors.index.json", index)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _token_id(tokenizer: Any, token: str) -> int:
    return int(tokenizer.convert_tokens_to_ids(token))


def save_model(
    out_dir: Path | str,
    config: dict[str, Any],
    weights: dict[str, np.ndarray],
    layout: Layout = "hf",
    shards: int = 1,
    num_crops: int = 4,
    with_position_ids: bool = False,
) -> Path:
    """Write a complete model directory.

    Args:
        out_dir: target folder (created if missing).
        config: the config dict; ``vocab_size`` must cover the tokenizer.
        weights: HF names and PyTorch shapes (``random_weights``).
        layout: ``'hf'``, ``'mlx'`` (conv OHWI, no position_ids) or ``'mlx-q4'`` (``'mlx'`` plus
            4-bit decoder linears and ``config["quantization"]``).
        shards: number of safetensors files; more than one also writes the index.
        num_crops: the ``num_crops`` of ``preprocessor_config.json``.
        with_position_ids: ``'hf'`` only: also store the CLIP ``position_ids`` buffer
            (int64 [1, n]) like old HF checkpoints, which loaders must drop.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    if len(tokenizer) > config["vocab_size"]:
        raise ValueError(f"vocab_size {config['vocab_size']} < tokenizer size {len(tokenizer)}")
    config = copy.deepcopy(config)
    tensors = _to_layout(weights, layout, with_position_ids)
    if layout == "mlx-q4":
        config["quantization"] = {"group_size": 64, "bits": 4}
    metadata = {"format": "pt" if layout == "hf" else "mlx"}
    _write_safetensors(out_dir, tensors, shards, metadata)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "preprocessor_config.json", _preprocessor_config(config, num_crops))
    stops = [config["eos_token_id"], _token_id(tokenizer, "<|endoftext|>")]
    generation = {
        "_from_model_config": True,
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [*stops, _token_id(tokenizer, "<|end|>")],
        "pad_token_id": config["pad_token_id"],
    }
    _write_json(out_dir / "generation_config.json", generation)
    return out_dir


def _preprocessor_config(config: dict[str, Any], num_crops: int) -> dict[str, Any]:
    return {
        "do_convert_rgb": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Phi3VImageProcessor",
        "num_crops": num_crops,
        "num_img_tokens": config["img_processor"]["num_img_tokens"],
        "processor_class": "Phi3VProcessor",
    }


def make_tiny_model(
    out_dir: Path | str,
    seed: int = 0,
    layout: Layout = "hf",
    shards: int = 1,
    num_crops: int = 4,
    with_position_ids: bool = False,
    **config_overrides: Any,
) -> Path:
    """Build a tiny random Phi-3-V model directory: ``tiny_config`` + ``random_weights`` + save.

    Args:
        out_dir: target folder.
        seed: weight seed.
        layout, shards, num_crops, with_position_ids: see ``save_model``.
        config_overrides: passed to ``tiny_config``.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    config = tiny_config(**config_overrides)
    weights = random_weights(config, seed)
    return save_model(out_dir, config, weights, layout, shards, num_crops, with_position_ids)
