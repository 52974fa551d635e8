"""The tiny checkpoints look like real Phi-3-V ones: names, shapes, layouts, tokenizer, scales.

Loading the weights strictly into transformers' ``Phi3ForCausalLM`` and ``CLIPVisionModel``
proves the tensor names and shapes are the real ones (PHI3V.md section 2).
"""

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from model.config import ModelConfig
from model.tiny import (
    SPECIAL_TOKENS,
    build_tokenizer,
    make_tiny_model,
    random_weights,
    tiny_config,
    weight_shapes,
)
from tests.reference import torch_clip, torch_phi3

CLIP = "model.vision_embed_tokens.img_processor."
CONV = CLIP + "vision_model.embeddings.patch_embedding.weight"
POSITION_IDS = CLIP + "vision_model.embeddings.position_ids"


def read_weights(model_dir: Path) -> dict[str, np.ndarray]:
    index = model_dir / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    weights = {}
    for name in files:
        weights.update(load_file(str(model_dir / name)))
    return weights


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_special_ids_bos_and_round_trip(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tok.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 3, 3, 0)
    assert len(tok) == 512
    for text in ["hi", "a red circle and a blue square on a white background", " x  y\n\tñ 😀 42"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == 1 and ids.count(1) == 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    chat = "<|user|>\nWhat is it?<|end|>\n<|assistant|>\n"
    ids = tok(chat)["input_ids"]
    assert ids[:2] == [1, tok.convert_tokens_to_ids("<|user|>")]
    assert tok.convert_tokens_to_ids("<|end|>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "\nWhat is it?\n\n"
    assert tok.decode(ids) == "<s>" + chat


DEMO = Path(__file__).resolve().parent.parent / "model" / "demo"


def test_tokenizer_config_loads_under_transformers_4_and_5(tmp_path):
    """transformers 5 saves the chat tokens as an ``extra_special_tokens`` list, which 4.47-4.57
    (the pyproject allows >=4.45) cannot load: every load of the demo model failed there. The
    built and the shipped tokenizer configs name them ``additional_special_tokens``, which 4 and 5
    both read, and they stay special tokens."""
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path / "tok")
    for folder in (tmp_path / "tok", DEMO):
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        assert not isinstance(settings.get("extra_special_tokens"), list)
        assert settings["additional_special_tokens"] == list(SPECIAL_TOKENS[4:])
        tok = AutoTokenizer.from_pretrained(folder)
        assert set(SPECIAL_TOKENS[4:]) <= set(tok.all_special_tokens)


def test_tokenizer_learns_extra_corpus(tmp_path):
    word = " zyzzyva"
    plain = build_tokenizer(tmp_path / "plain")
    trained = build_tokenizer(tmp_path / "extra", corpus=[word * 50] * 20)
    assert len(trained(word)["input_ids"]) < len(plain(word)["input_ids"])
    build_tokenizer(tmp_path / "again")
    tokenizer_json = [(tmp_path / d / "tokenizer.json").read_bytes() for d in ("plain", "again")]
    assert tokenizer_json[0] == tokenizer_json[1]  # deterministic


# --- config ----------------------------------------------------------------------------------


def test_config_is_a_phi3_v_config():
    raw = tiny_config()
    config = ModelConfig.from_dict(raw)
    assert raw["model_type"] == "phi3_v" and raw["architectures"] == ["Phi3VForCausalLM"]
    assert config.head_dim == 16 and config.vision.tokens_per_side == 2
    assert raw["img_processor"]["num_img_tokens"] == 4 and config.image_dim_out == 32
    rope = raw["rope_scaling"]
    assert rope["type"] == "su"
    assert len(rope["short_factor"]) == len(rope["long_factor"]) == 8
    assert 1.0 <= min(rope["short_factor"]) and max(rope["short_factor"]) <= 3.0
    assert 1.0 <= min(rope["long_factor"]) and max(rope["long_factor"]) <= 60.0
    assert raw["vocab_size"] % 64 == 0


def test_config_overrides_merge_and_rederive():
    raw = tiny_config(vision_config=dict(num_hidden_layers=4), hidden_size=128)
    vision = raw["img_processor"]["vision_config"]
    assert vision["num_hidden_layers"] == 4 and vision["hidden_size"] == 32
    assert len(raw["rope_scaling"]["short_factor"]) == 128 // 4 // 2
    raw = tiny_config(img_processor=dict(vision_config=dict(hidden_size=64, image_size=84)))
    assert raw["img_processor"]["image_dim_out"] == 64
    assert raw["img_processor"]["num_img_tokens"] == 9
    ModelConfig.from_dict(raw)


# --- weights ---------------------------------------------------------------------------------


def test_every_tensor_has_the_real_shape(tiny_model_dir):
    config = read_config(tiny_model_dir)
    weights = read_weights(tiny_model_dir)
    assert {k: v.shape for k, v in weights.items()} == weight_shapes(config)
    assert all(v.dtype == np.float32 for v in weights.values())
    assert weights["model.layers.0.self_attn.qkv_proj.weight"].shape == (3 * 64, 64)
    assert weights["model.layers.1.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)
    assert weights[CONV].shape == (32, 3, 14, 14)
    assert weights[CLIP + "vision_model.embeddings.position_embedding.weight"].shape == (17, 32)
    assert CLIP + "vision_model.encoder.layers.2.mlp.fc2.bias" in weights  # the unused last layer
    assert CLIP + "vision_model.post_layernorm.weight" in weights
    assert weights["model.vision_embed_tokens.glb_GN"].shape == (1, 1, 128)
    assert weights["model.vision_embed_tokens.sub_GN"].shape == (1, 1, 1, 128)
    assert not np.array_equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_model_dir_files(tiny_model_dir):
    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    pre = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert pre["num_crops"] == 4 and pre["num_img_tokens"] == 4
    assert pre["image_processor_type"] == "Phi3VImageProcessor"
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert 6 in generation["eos_token_id"] and generation["bos_token_id"] == 1  # 6 is <|end|>
    with safe_open(str(tiny_model_dir / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharded_index_covers_every_tensor(tiny_model_dir, tiny_model_dir_sharded):
    index = json.loads((tiny_model_dir_sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert files == {f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)}
    assert not (tiny_model_dir_sharded / "model.safetensors").exists()
    sharded, single = read_weights(tiny_model_dir_sharded), read_weights(tiny_model_dir)
    assert set(index["weight_map"]) == set(sharded)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in sharded.values())
    position_ids = sharded.pop(POSITION_IDS)
    assert position_ids.dtype == np.int64 and position_ids.tolist() == [list(range(17))]
    assert sharded.keys() == single.keys()
    assert all(np.array_equal(sharded[k], single[k]) for k in single)


def test_mlx_layout_is_ohwi(tiny_model_dir, tiny_model_dir_mlx):
    hf, mlx = read_weights(tiny_model_dir), read_weights(tiny_model_dir_mlx)
    assert mlx[CONV].shape == (32, 14, 14, 3)
    np.testing.assert_array_equal(mlx[CONV], hf[CONV].transpose(0, 2, 3, 1))
    assert not any(k.endswith("position_ids") for k in mlx)
    assert mlx.keys() == hf.keys()
    with safe_open(str(tiny_model_dir_mlx / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "mlx"}


def test_q4_layout_quantizes_decoder_linears(tiny_model_dir, tiny_model_dir_q4):
    import mlx.core as mx

    hf, q4 = read_weights(tiny_model_dir), read_weights(tiny_model_dir_q4)
    assert read_config(tiny_model_dir_q4)["quantization"] == {"group_size": 64, "bits": 4}
    quantized = sorted(k[: -len(".scales")] for k in q4 if k.endswith(".scales"))
    assert len(quantized) == 2 * 4 + 1 and "lm_head" in quantized
    assert all(".vision_embed_tokens." not in k for k in quantized)
    for path in quantized:
        packed = q4[path + ".weight"]
        assert packed.dtype == np.uint32
        args = (mx.array(q4[path + ".scales"]), mx.array(q4[path + ".biases"]))
        restored = np.array(mx.dequantize(mx.array(packed), *args, group_size=64, bits=4))
        original = hf[path + ".weight"]
        assert restored.shape == original.shape
        assert np.abs(restored - original).max() < 0.2 * np.abs(original).max()
    assert q4["model.embed_tokens.weight"].dtype == np.float32


def test_weights_are_deterministic_per_seed():
    config = tiny_config()
    a, b, c = random_weights(config, 0), random_weights(config, 0), random_weights(config, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["lm_head.weight"], c["lm_head.weight"])
    assert not np.array_equal(a[CONV], c[CONV])


def test_same_seed_same_files(tiny_model_dir, tmp_path):
    again = make_tiny_model(tmp_path / "again", seed=0)
    for name in ["model.safetensors", "config.json", "tokenizer.json"]:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()


# --- the real architectures accept the weights ----------------------------------------------


def test_phi3_for_causal_lm_loads_strictly_and_decodes_varied_tokens(tiny_model_dir):
    import torch

    model = torch_phi3(read_config(tiny_model_dir), read_weights(tiny_model_dir))
    ids = [1, 4, 208, 96, 81, 285, 6, 208, 5, 208]
    gaps = []
    with torch.no_grad():
        for _ in range(24):
            out = model(torch.tensor([ids]), output_hidden_states=True)
            top2 = out.logits[0, -1].topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            ids.append(int(out.logits[0, -1].argmax()))
        hidden_std = [float(h.std()) for h in out.hidden_states]
    generated = ids[10:]
    assert len(set(generated)) >= 8, generated  # not stuck on one token
    assert min(gaps) > 1e-3  # no near-ties that float rounding could flip
    assert float(out.logits.std()) > 1.0  # well spread logits
    assert all(0.3 < s < 10 for s in hidden_std), hidden_std  # activations stay O(1)


def test_clip_vision_model_loads_strictly_and_keeps_features_o1(tiny_model_dir):
    import torch

    weights = read_weights(tiny_model_dir)
    model = torch_clip(read_config(tiny_model_dir), weights)

    pixels = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 56, 56)).astype("f4"))
    with torch.no_grad():
        features = model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    assert 0.3 < features.std() < 10
    assert np.abs(features[0] - features[1]).mean() > 0.1  # different images, different features
    # 2x2 merge (any order will do for scale) and the projector: still O(1)
    merged = features.reshape(2, 2, 2, 2, 2, 32).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 128)
    p = "model.vision_embed_tokens.img_projection."
    hidden = merged @ weights[p + "0.weight"].T + weights[p + "0.bias"]
    hidden = torch.nn.functional.gelu(torch.from_numpy(hidden)).numpy()
    projected = hidden @ weights[p + "2.weight"].T + weights[p + "2.bias"]
    assert 0.2 < projected.std() < 10


# --- OpenBLAS helper (loaded by conftest) ---------------------------------------------------


def test_load_openblas_is_idempotent_and_configurable(monkeypatch):
    from jobrunner import _blas

    first = _blas.load_openblas()
    assert _blas.load_openblas() == first
    monkeypatch.setenv("JOBRUNNER_BLAS", "none")
    assert _blas._candidates() == []
    monkeypatch.setenv("JOBRUNNER_BLAS", "/no/such/libopenblas.so.0")
    assert _blas._candidates() == ["/no/such/libopenblas.so.0"]


def test_tune_allocator_sets_glibc_thresholds():
    import platform
    import sys

    from jobrunner import _blas

    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert _blas.tune_allocator() is on_glibc  # both mallopt calls accepted where glibc runs
