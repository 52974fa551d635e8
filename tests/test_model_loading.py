"""Loading: every checkpoint layout, quantization, config validation and clear failures."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from model.config import ModelConfig
from model.generate import GenerationParams, generate_batch, image_features, kv_bytes_per_token
from model.loading import ModelLoadError, build_model, load, weights_identity
from model.tiny import random_weights, save_model, tiny_config

_CLIP = "model.vision_embed_tokens.img_processor.vision_model."

PROMPT = "Describe the picture."


def first_logits(model, processor):
    row = processor.prepare(PROMPT, None)
    ids = mx.array([row.input_ids])
    return model(ids, mx.arange(ids.shape[1])[None])[0, -1]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model, processor = load(str(tiny_model_dir))
    return first_logits(model, processor)


@pytest.mark.parametrize(
    "fixture", ["tiny_model_dir", "tiny_model_dir_sharded", "tiny_model_dir_mlx"]
)
def test_float_layouts_load_to_the_same_model(fixture, request, reference):
    model, processor = load(str(request.getfixturevalue(fixture)))
    assert mx.allclose(first_logits(model, processor), reference, atol=1e-5)
    result = generate_batch(
        model, processor, [processor.prepare(PROMPT, None)], GenerationParams(4)
    )
    assert result[0].output_tokens == 4


def assert_expanded_like(model, kept, processor, module):
    """``model`` holds ``kept``'s quantized layers as float ones that compute the same: on the
    CPU, where MLX's quantized matmul is many times slower, quantized layers are expanded."""
    assert model.quantized_on_cpu == "expanded" and kept.quantized_on_cpu is None
    assert type(module(model)) in (nn.Linear, nn.Embedding)
    assert isinstance(module(kept), nn.QuantizedLinear | nn.QuantizedEmbedding)
    ours, theirs = first_logits(model, processor), first_logits(kept, processor)
    assert float(mx.abs(ours - theirs).max()) < 1e-4 * float(mx.abs(theirs).max())


def test_quantized_checkpoint_loads_and_generates(tiny_model_dir_q4, reference):
    model, processor = load(str(tiny_model_dir_q4))
    kept = build_model(tiny_model_dir_q4, expand=False)
    assert_expanded_like(model, kept, processor, lambda m: m.layers[0].self_attn.qkv_proj)
    assert not isinstance(kept.vision.img_projection[0], nn.QuantizedLinear)
    logits = first_logits(model, processor)
    assert float(mx.abs(logits - reference).max()) < 0.25 * float(mx.abs(reference).max())
    result = generate_batch(
        model, processor, [processor.prepare(PROMPT, None)], GenerationParams(4)
    )
    assert result[0].output_tokens == 4


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_at_load(tiny_model_dir, reference, bits):
    model, processor = load(str(tiny_model_dir), quantize=bits)
    kept = build_model(tiny_model_dir, quantize=bits, expand=False)
    assert_expanded_like(model, kept, processor, lambda m: m.layers[1].mlp.down_proj)
    assert kept.layers[1].mlp.down_proj.bits == bits
    logits = first_logits(model, processor)
    assert float(mx.abs(logits - reference).max()) < 0.25 * float(mx.abs(reference).max())


def test_quantized_layers_stay_quantized_where_float_ones_would_not_fit(
    tiny_model_dir, monkeypatch
):
    monkeypatch.setattr("model.loading.device_memory_bytes", lambda: 1 << 20)  # 1 MiB
    model = build_model(tiny_model_dir, quantize=8)
    assert model.quantized_on_cpu == "kept"
    assert isinstance(model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert build_model(tiny_model_dir).quantized_on_cpu is None  # nothing quantized
    monkeypatch.setattr("model.loading.device_memory_bytes", lambda: None)  # unknown: expanded
    assert build_model(tiny_model_dir, quantize=8).quantized_on_cpu == "expanded"


def test_expanding_quantized_layers_holds_no_second_copy_of_the_weights(tiny_model_dir):
    """Expansion frees each layer's packed weights as it replaces it, and the checkpoint's float
    weights once quantized: the load's peak is about the expanded model's size, not the packed
    and float weights together (1.6x with --quantize 8 before)."""
    from model.generate import weight_bytes

    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()  # what earlier tests keep alive
    mx.reset_peak_memory()
    model = build_model(tiny_model_dir, quantize=8)
    assert model.quantized_on_cpu == "expanded"
    assert mx.get_peak_memory() - base < 1.2 * weight_bytes(model)


def test_expand_quantized_frees_each_layers_packed_weights_as_it_goes():
    """A layer at a time: the packed weights of the layers done are gone before the next one is
    expanded (holding them all until the end took 1.28x the float weights at 8 bits)."""
    from model.loading import expand_quantized

    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    model = nn.Sequential(*(nn.Linear(512, 256) for _ in range(32)))
    nn.quantize(model, group_size=64, bits=8)
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    expand_quantized(model, mx.float32)
    floats = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert all(type(layer) is nn.Linear for layer in model.layers)
    assert mx.get_peak_memory() - base < 1.15 * floats


@pytest.mark.parametrize("bits", [4, 8, None])
def test_expanded_size_is_computed_before_expanding(tiny_model_dir, tiny_model_dir_q4, bits):
    """The memory check's figure is the expanded model's size (linears, embeddings, biases)."""
    from model.generate import weight_bytes
    from model.loading import _expanded_bytes, expand_quantized

    model = build_model(tiny_model_dir_q4 if bits is None else tiny_model_dir, None, bits, False)
    expected = _expanded_bytes(model, mx.float32)
    expand_quantized(model, mx.float32)
    assert expected == weight_bytes(model)


def test_checkpoint_quantized_in_another_mode_loads(tiny_model_dir_mlx, tmp_path):
    """A checkpoint quantized as mxfp4 (scales, no biases; ``quantization.mode``) loads in that
    mode (it failed with "missing tensors: ...biases") and computes as its quantized layers."""
    q_dir = copy_model(tiny_model_dir_mlx, tmp_path / "mxfp4")
    tensors = load_file(q_dir / "model.safetensors")
    for name, value in list(tensors.items()):
        if name.startswith("model.layers.") and value.ndim == 2 and value.shape[-1] % 32 == 0:
            packed, scales = mx.quantize(mx.array(value), group_size=32, bits=4, mode="mxfp4")
            tensors[name], tensors[name[: -len(".weight")] + ".scales"] = (
                np.array(packed),
                np.array(scales),
            )
    save_file(tensors, q_dir / "model.safetensors", metadata={"format": "mlx"})
    config = json.loads((q_dir / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    (q_dir / "config.json").write_text(json.dumps(config))
    model, processor = load(str(q_dir))
    kept = build_model(q_dir, expand=False)
    assert kept.layers[0].mlp.down_proj.mode == "mxfp4"
    assert_expanded_like(model, kept, processor, lambda m: m.layers[0].mlp.down_proj)


def copy_model(src, dst):
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    broken = copy_model(tiny_model_dir, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing tensors: model\.layers\.1\.mlp\.down_proj"):
        load(str(broken))


def test_misshaped_tensor_is_named(tiny_model_dir, tmp_path):
    broken = copy_model(tiny_model_dir, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = np.ones(7, dtype=np.float32)
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"wrong shape: model\.norm\.weight \(7,\)"):
        load(str(broken))


def test_missing_directory_and_uncached_hub_id(monkeypatch, tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load(str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="not a local directory") as err:
        load("microsoft/Phi-3.5-vision-instruct")
    assert "\n" not in str(err.value) and "from the job file's folder" in str(err.value)


def test_weights_identity_changes_with_weights(tiny_model_dir, tiny_model_dir_mlx, tmp_path):
    assert weights_identity(tiny_model_dir) == weights_identity(tiny_model_dir)
    assert weights_identity(tiny_model_dir) != weights_identity(tiny_model_dir_mlx)
    # a copy elsewhere is the same model
    assert weights_identity(copy_model(tiny_model_dir, tmp_path / "copy")) == weights_identity(
        tiny_model_dir
    )
    # weights replaced in place with the same names and shapes (retrained, fine-tuned) are not
    for name in (None, "lm_head.weight", "model.layers.1.mlp.down_proj.weight"):
        changed = copy_model(tiny_model_dir, tmp_path / str(name))
        with safe_open(changed / "model.safetensors", "np") as f:
            metadata = f.metadata()
        weights = load_file(changed / "model.safetensors")
        if name is not None:
            weights[name] = weights[name] + np.float32(1e-3)
        save_file(weights, changed / "model.safetensors", metadata=metadata)
        same = weights_identity(changed) == weights_identity(tiny_model_dir)
        assert same == (name is None)  # rewritten unchanged: the same header, the same hash


def test_weights_identity_of_a_malformed_header_leaves_the_error_to_load(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}).encode()
    file = tmp_path / "model.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    assert len(weights_identity(tmp_path)) == 16  # no traceback before load's clear message


def microsoft_config(rope_type: str) -> dict:
    return {
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {
            "type": rope_type,
            "short_factor": [1.05] * 48,
            "long_factor": [1.03] * 48,
        },
        "sliding_window": 131072,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "img_processor": {
            "image_dim_out": 1024,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
        },
        "torch_dtype": "bfloat16",
        "some_future_key": {"ignored": True},
    }


@pytest.mark.parametrize("rope_type", ["su", "longrope"])
def test_microsoft_configs_parse(rope_type):
    config = ModelConfig.from_dict(microsoft_config(rope_type))
    assert config.head_dim == 96
    assert config.vision.hidden_size == 1024 and config.vision.num_hidden_layers == 24
    assert config.vision.tokens_per_side == 12
    assert abs(config.rope_mscale - 1.19024) < 1e-4


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_attention_heads": 7}, "num_attention_heads"),
        ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 48}}, "long_factor"),
        ({"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}}, "short"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.type"),
        ({"img_processor": {"image_dim_out": 512}}, "image_dim_out"),
    ],
)
def test_impossible_configs_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(microsoft_config("su") | change)


def test_bad_config_json_is_a_load_error(tiny_model_dir, tmp_path):
    broken = copy_model(tiny_model_dir, tmp_path / "broken")
    config = tiny_config(num_attention_heads=3)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="num_attention_heads"):
        load(str(broken))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_follow_float32(tiny_model_dir, reference, dtype):
    model, processor = load(str(tiny_model_dir), dtype=dtype)
    assert model.layers[0].mlp.down_proj.weight.dtype == getattr(mx, dtype)
    logits = first_logits(model, processor)
    assert logits.dtype == mx.float32  # logits come back in float32 whatever the compute dtype
    assert float(mx.abs(logits - reference).max()) < 0.1 * float(mx.abs(reference).max())
    row = processor.prepare(PROMPT, Image.new("RGB", (90, 40), "red"))
    result = generate_batch(model, processor, [row], GenerationParams(3))
    assert result[0].output_tokens == 3


def _position_embedding(model):
    return model.vision.img_processor.vision_model.embeddings.position_embedding


def test_checkpoint_with_quantized_vision_tower_loads_and_encodes(tmp_path):
    """mlx-vlm's converter quantizes the vision tower as well (its linears and the CLIP position
    embedding) and the token embedding unless told to skip them; such a checkpoint loads,
    encodes images and sizes its cache by the activations' dtype."""
    config = tiny_config(vision_config={"hidden_size": 64, "intermediate_size": 128})
    weights = random_weights(config)
    float_dir = save_model(tmp_path / "float", config, weights, layout="mlx")
    q4_dir = save_model(tmp_path / "q4-vision", config, weights, layout="mlx")
    tensors = load_file(q4_dir / "model.safetensors")
    for name, value in list(tensors.items()):
        towers = ".vision_model." in name or name == "model.embed_tokens.weight"
        if towers and value.ndim == 2 and value.shape[-1] % 64 == 0:
            packed, scales, biases = mx.quantize(mx.array(value), group_size=64, bits=4)
            path = name[: -len(".weight")]
            tensors[name] = np.array(packed)
            tensors[path + ".scales"], tensors[path + ".biases"] = (
                np.array(scales),
                np.array(biases),
            )
    assert f"{_CLIP}embeddings.position_embedding.scales" in tensors
    save_file(tensors, q4_dir / "model.safetensors", metadata={"format": "mlx"})
    config_file = q4_dir / "config.json"
    quantized_config = {
        **json.loads(config_file.read_text()),
        "quantization": {"group_size": 64, "bits": 4},
    }
    config_file.write_text(json.dumps(quantized_config))

    model, processor = load(str(q4_dir))
    kept = build_model(q4_dir, expand=False)
    assert_expanded_like(model, kept, processor, _position_embedding)
    assert_expanded_like(model, kept, processor, lambda m: m.model.embed_tokens)
    row = processor.prepare(PROMPT, Image.new("RGB", (90, 40), "red"))
    features = image_features(kept, [row], 4)
    assert mx.allclose(image_features(model, [row], 4), features, atol=1e-4)
    ours = image_features(model, [row], 4)
    float_model = load(str(float_dir))[0]
    reference = image_features(float_model, [row], 4)
    half = load(str(q4_dir), dtype="bfloat16")[0]  # 2-byte activations, 4-byte packed weights
    assert kv_bytes_per_token(half) == kv_bytes_per_token(float_model) // 2
    assert float(mx.abs(ours - reference).max()) < 0.25 * float(mx.abs(reference).max())
    assert generate_batch(model, processor, [row], GenerationParams(3))[0].output_tokens == 3


def test_loading_prints_no_transformers_advisory(tiny_model_dir):
    """A fresh process that loads a model writes nothing to stderr (no "PyTorch was not found"
    advisory from importing transformers, which every --quiet cron run used to print)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env["PYTHONPATH"] = str(root)
    # torch hidden as on a machine without it (the dev extras install it; find_spec sees None)
    code = (
        "import sys; sys.modules['torch'] = None; from model.loading import load; load(sys.argv[1])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stderr
