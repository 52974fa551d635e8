"""Parity with the transformers reference on the same random weights (torch, CPU, float32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from model.cache import PrefixCache, make_cache
from model.config import ModelConfig
from model.generate import _left_pad, image_features, prefill, prefill_rows
from model.language import attention_mask, position_ids
from model.phi3_v import Model, sanitize
from model.processing import PreparedRow, hd_transform, image_feature_index
from model.tiny import random_weights, tiny_config
from tests.reference import torch_clip, torch_phi3

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 on the CPU agrees to rounding. MLX's CUDA backend runs float32 matmuls in TF32 (10
# mantissa bits), which moves results by about 1e-3 relative; the suite can run there too.
ON_CPU = mx.default_device() == mx.cpu
TOL = 1e-4 if ON_CPU else 1e-2


def mlx_model(config: dict, weights: dict[str, np.ndarray]) -> Model:
    model = Model(ModelConfig.from_dict(config))
    model.load_weights(list(sanitize({k: mx.array(v) for k, v in weights.items()}).items()))
    return model


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(
    ("switch", "lengths"),
    [(4096, [5, 17, 11, 1, 23]), (16, [20, 31, 17, 26])],
    ids=["short-factors", "long-factors"],
)
def test_decoder_logits_match_transformers_left_padded(switch, lengths):
    config = tiny_config(original_max_position_embeddings=switch)
    weights = random_weights(config, seed=3)
    rng = np.random.default_rng(0)
    width = max(lengths)
    pad_id = config["pad_token_id"]
    ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    real = np.zeros_like(ids, dtype=bool)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = rng.integers(16, 500, size=n)
        real[b, width - n :] = True
    pad = mx.array([width - n for n in lengths])

    ours = mlx_model(config, weights)(
        mx.array(ids), position_ids(pad, 0, width), attention_mask(pad, 0, width)
    )
    hf_positions = np.where(real, np.cumsum(real, axis=1) - 1, 1)
    with torch.no_grad():
        ref = torch_phi3(config, weights)(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(real.astype(np.int64)),
            position_ids=torch.from_numpy(hf_positions),
        ).logits.numpy()
    assert relative_error(np.array(ours)[real], ref[real]) <= TOL


def test_clip_hidden_state_minus_two_matches_transformers():
    config = tiny_config()
    vision = config["img_processor"]["vision_config"]
    weights = random_weights(config, seed=5)
    clip = torch_clip(config, weights)
    size = vision["image_size"]
    pixels = np.random.default_rng(1).normal(size=(3, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = clip(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2].numpy()
    ours = mlx_model(config, weights).vision.img_processor(mx.array(pixels.transpose(0, 2, 3, 1)))
    assert relative_error(np.array(ours), ref) <= TOL


def hd_layout_reference(merged, sub_gn, glb_gn, grids, t):
    """The HD layout written out plainly: for each image, the tile map row by row with a
    newline after each row, then glb_GN, then the global map with newlines."""
    out, crop = [], 0
    for h, w in grids:
        glb, tiles = merged[crop], merged[crop + 1 : crop + 1 + h * w]
        crop += 1 + h * w
        for row in range(h * t):
            for col in range(w * t):
                tile = tiles[(row // t) * w + col // t]
                out.append(tile[(row % t) * t + col % t])
            out.append(sub_gn)
        out.append(glb_gn)
        for row in range(t):
            out.extend(glb[row * t : (row + 1) * t])
            out.append(sub_gn)
    return np.stack(out)


def test_hd_layout_and_projection_match_plain_reference():
    config = tiny_config()
    weights = random_weights(config, seed=7)
    model = mlx_model(config, weights)
    t = model.config.vision.tokens_per_side
    grids = [(1, 3), (2, 2), (3, 1)]
    n_crops = sum(1 + h * w for h, w in grids)
    merged = np.random.default_rng(2).normal(size=(n_crops, t * t, 128)).astype(np.float32)
    index, offset = [], 0
    for h, w in grids:
        index.append(image_feature_index(h, w, offset, t))
        offset += 1 + h * w
    vision = model.vision
    ours = vision.project(mx.array(merged), mx.array(np.concatenate(index)))

    sub_gn = weights["model.vision_embed_tokens.sub_GN"].reshape(-1)
    glb_gn = weights["model.vision_embed_tokens.glb_GN"].reshape(-1)
    x = torch.from_numpy(hd_layout_reference(merged, sub_gn, glb_gn, grids, t))
    p = "model.vision_embed_tokens.img_projection."
    w0, b0 = (torch.from_numpy(weights[p + n]) for n in ("0.weight", "0.bias"))
    w2, b2 = (torch.from_numpy(weights[p + n]) for n in ("2.weight", "2.bias"))
    ref = torch.nn.functional.gelu(x @ w0.T + b0) @ w2.T + b2
    assert ours.shape == tuple(ref.shape)
    assert relative_error(np.array(ours), ref.numpy()) <= (1e-5 if ON_CPU else TOL)


def hf_last_logits(phi, ids: list[int], features: np.ndarray | None = None) -> np.ndarray:
    """The reference's last-position logits for one row in one pass (image slots filled by
    ``features`` in order)."""
    with torch.no_grad():
        t = torch.tensor([ids])
        embeddings = phi.model.embed_tokens(t.clamp_min(0))
        if features is not None:
            slots = torch.nonzero(t < 0, as_tuple=True)
            embeddings = embeddings.index_put(slots, torch.from_numpy(features))
        return phi(inputs_embeds=embeddings).logits[0, -1].numpy()


def test_chunked_prefill_chooses_rotary_factors_for_the_whole_prompt():
    """A prompt longer than original_max_position_embeddings (16 standing for 4096) takes the
    long factors at every position in the reference's single pass; prefilled in chunks of 8,
    the first chunks must take them too. Rows of a left-padded batch, each against itself."""
    config = tiny_config(original_max_position_embeddings=16)
    weights = random_weights(config, seed=3)
    model, phi = mlx_model(config, weights), torch_phi3(config, weights)
    rng = np.random.default_rng(0)
    rows = [rng.integers(16, 500, size=n).tolist() for n in (40, 21, 12)]
    ids, pad = _left_pad([PreparedRow(r, []) for r in rows], config["pad_token_id"])
    ours = np.array(prefill(model, ids, pad, make_cache(len(model.layers)), None, chunk=8))
    for b, row in enumerate(rows):
        assert relative_error(ours[b], hf_last_logits(phi, row)) <= TOL


def test_prompt_prefix_takes_the_rotary_factors_of_its_whole_prompt():
    """Row prefill runs an image row's prefix and the rest as two passes and keeps the prefix;
    a prefix shorter than original_max_position_embeddings must still take the long factors
    when its whole prompt is longer, and must not be shared with a short prompt over it."""
    config = tiny_config(original_max_position_embeddings=16)
    weights = random_weights(config, seed=11)
    model, phi = mlx_model(config, weights), torch_phi3(config, weights)
    vision = config["img_processor"]["vision_config"]
    size = vision["image_size"]
    rng = np.random.default_rng(0)
    pixels = Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    image = hd_transform(pixels, 1, size, tokens_per_side=size // vision["patch_size"] // 2)
    prefix = [1, 40] + [-1] * image.num_tokens
    short = PreparedRow(prefix + [1], [image])  # 16 positions: short factors
    long = PreparedRow(prefix + rng.integers(16, 500, 12).tolist(), [image])  # long factors
    assert len(short.input_ids) <= 16 < len(long.input_ids)
    features = np.array(image_features(model, [short], 4))
    prefixes = PrefixCache()
    for order in ([short, long], [long, short]):
        for row in order:
            ids, _ = _left_pad([row], config["pad_token_id"])
            cache = make_cache(len(model.layers))
            ours = prefill_rows(
                model, [row], ids.shape[1], cache, [mx.array(features)], 8, 1, prefixes
            )
            ref = hf_last_logits(phi, row.input_ids, features)
            assert relative_error(np.array(ours)[0], ref) <= TOL
    assert len(prefixes) == 2 and prefixes.hits == 2


@pytest.mark.parametrize("factor", ["short_factor", "long_factor"])
def test_reference_runs_with_the_longrope_factors(factor):
    """The reference must read the config's su/longrope factors under every transformers the
    pyproject allows: transformers 4 keeps an unknown ``rope_parameters`` as a plain attribute
    and ran plain RoPE, which failed the parity tests above as a model bug."""
    config = tiny_config(original_max_position_embeddings=16)
    weights = random_weights(config, seed=3)
    length = 12 if factor == "short_factor" else 24  # either side of the 16 positions
    ids = torch.from_numpy(np.random.default_rng(0).integers(16, 500, size=(1, length)))
    changed = tiny_config(original_max_position_embeddings=16)
    changed["rope_scaling"][factor] = [f * 2.0 for f in changed["rope_scaling"][factor]]
    with torch.no_grad():
        first = torch_phi3(config, weights)(input_ids=ids).logits
        second = torch_phi3(changed, weights)(input_ids=ids).logits
    assert not torch.allclose(first, second)
