"""model/processing.py: HD transform parity, slot counts, feature index, prompt tokenizing.

The reference pipeline below redoes the Hugging Face Phi-3-V image processor (PHI3V.md section 3)
with PIL and torch operations, so the numpy implementation is checked against torch itself.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from model.config import ModelConfig
from model.processing import (
    CLIP_MEAN,
    CLIP_STD,
    ImageInput,
    Processor,
    bicubic_resize,
    crop_grid,
    hd_transform,
    image_feature_index,
    image_token_count,
)
from model.tiny import tiny_config

TINY_S, TINY_T = 56, 2  # crop size and tokens per side of the tiny test model
SIZES = {
    "portrait": (400, 700),
    "landscape": (800, 450),
    "tiny": (10, 7),
    "huge": (5000, 300),
    "square": (640, 640),
}
# (h_crop, w_crop) at crop size 336, worked out by hand from PHI3V.md section 3.
EXPECTED_GRIDS = {
    ("portrait", 1): (1, 1),
    ("portrait", 4): (2, 2),
    ("portrait", 16): (5, 3),
    ("landscape", 4): (2, 2),
    ("landscape", 16): (3, 5),
    ("tiny", 4): (2, 2),
    ("tiny", 16): (3, 4),
    ("huge", 1): (1, 1),
    ("huge", 4): (1, 4),
    ("huge", 16): (1, 16),
    ("square", 4): (2, 2),
    ("square", 16): (4, 4),
}


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_padded(image: Image.Image, num_crops: int, crop_size: int) -> torch.Tensor:
    """The reference processor's normalised, resized and padded image, [3, Hp, Wp]."""
    img = image.convert("RGB")
    transposed = img.width < img.height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    ratio = img.width / img.height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = scale * crop_size
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = int(np.ceil(new_h / crop_size) * crop_size)
    canvas = Image.new("RGB", (new_w, target), (255, 255, 255))
    canvas.paste(img, (0, int((target - new_h) / 2)))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    x = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def reference_hd(image: Image.Image, num_crops: int, crop_size: int) -> torch.Tensor:
    """The reference processor's crops for one image, [1 + h*w, 3, S, S] (before zero padding)."""
    x = reference_padded(image, num_crops, crop_size)
    h, w = x.shape[1] // crop_size, x.shape[2] // crop_size
    glb = F.interpolate(x[None], size=(crop_size, crop_size), mode="bicubic", align_corners=False)
    tiles = x.reshape(3, h, crop_size, w, crop_size).permute(1, 3, 0, 2, 4)
    return torch.cat([glb, tiles.reshape(h * w, 3, crop_size, crop_size)])


def normalised(rgb: tuple[int, int, int]) -> np.ndarray:
    pixel = np.asarray(rgb, dtype=np.float32) / np.float32(255)
    return (pixel - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def fake_image(num_tokens: int) -> ImageInput:
    return ImageInput(np.zeros((1, 1, 1, 3), np.float32), 1, 1, num_tokens, (1, 1), "k")


@pytest.fixture(scope="module")
def tiny_model_config() -> ModelConfig:
    return ModelConfig.from_dict(tiny_config())


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def processor(tokenizer, tiny_model_config: ModelConfig) -> Processor:
    return Processor(tokenizer, tiny_model_config, num_crops=4)


# --- global view and HD transform -------------------------------------------------------------


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [
        ((336, 336), (336, 336)),
        ((1344, 1008), (336, 336)),
        ((700, 5), (336, 336)),
        ((5, 700), (336, 336)),
        ((100, 37), (336, 336)),
        ((1, 1), (56, 56)),
        ((997, 13), (56, 40)),
    ],
)
def test_bicubic_resize_matches_torch(in_hw, out_hw):
    rng = np.random.default_rng(1)
    pixels = rng.uniform(-1.8, 2.2, (*in_hw, 3)).astype(np.float32)
    ours = bicubic_resize(pixels, *out_hw)
    ref = F.interpolate(
        torch.from_numpy(pixels).permute(2, 0, 1)[None],
        size=out_hw,
        mode="bicubic",
        align_corners=False,
    )
    assert ours.shape == (*out_hw, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref[0].permute(1, 2, 0).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "size, num_crops, crop_size",
    [
        ((150, 260), 4, TINY_S),
        ((500, 210), 16, TINY_S),
        ((10, 7), 16, TINY_S),
        ((31, 900), 1, TINY_S),
        ((700, 400), 4, 336),
    ],
)
def test_hd_transform_matches_reference_pipeline(size, num_crops, crop_size):
    image = noise_image(*size)
    ours = hd_transform(image, num_crops, crop_size, tokens_per_side=crop_size // 28)
    ref = reference_hd(image, num_crops, crop_size).permute(0, 2, 3, 1).numpy()
    assert ours.crops.shape == ref.shape
    np.testing.assert_array_equal(ours.crops[1:], ref[1:])  # same float32 ops: exact
    np.testing.assert_allclose(ours.crops[0], ref[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("crop_size", [336, TINY_S])
@pytest.mark.parametrize("num_crops", [1, 4, 16])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_hd_transform_shapes(name, num_crops, crop_size):
    width, height = SIZES[name]
    t = crop_size // 28
    out = hd_transform(
        Image.new("RGB", (width, height), (90, 30, 200)), num_crops, crop_size, tokens_per_side=t
    )
    h, w = out.h_crop, out.w_crop
    assert out.crops.shape == (1 + h * w, crop_size, crop_size, 3)
    assert out.crops.dtype == np.float32
    assert 1 <= h * w <= num_crops
    assert (h, w) == crop_grid(width, height, num_crops, crop_size)
    assert out.padded_size == (h * crop_size, w * crop_size)
    assert out.num_tokens == image_token_count(width, height, num_crops, crop_size, t)
    if crop_size == 336 and (name, num_crops) in EXPECTED_GRIDS:
        assert (h, w) == EXPECTED_GRIDS[name, num_crops]
    if h != w:  # the long side of the image stays the long side of the grid
        assert (w > h) == (width > height)


def test_token_count_examples():
    assert image_token_count(1344, 1344, 16) == 2509
    assert image_token_count(672, 672, 4) == 757
    assert image_token_count(10, 7, 16) == (3 * 4 + 1) * 144 + 1 + (3 + 1) * 12
    assert image_token_count(112, 112, 4, TINY_S, TINY_T) == (2 * 2 + 1) * 4 + 1 + 3 * 2
    assert crop_grid(300, 5000, 16) == (16, 1)
    assert crop_grid(100_000, 1, 1) == (1, 1)  # would truncate to 0 rows


@pytest.mark.parametrize("size, num_crops", [((0, 10), 4), ((10, 10), 0)])
def test_bad_sizes_raise(size, num_crops):
    with pytest.raises(ValueError):
        crop_grid(*size, num_crops)


@pytest.mark.parametrize(
    "size, rows",  # rows (of the landscape-oriented image) that hold the image, the rest is white
    [((400, 100), (126, 210)), ((1000, 333), (112, 223)), ((100, 400), (126, 210))],
)
def test_white_padding(size, rows):
    out = hd_transform(Image.new("RGB", size, (0, 0, 0)), 1)
    tile = out.crops[1]
    if size[0] < size[1]:  # portrait: the padding is left and right
        tile = tile.transpose(1, 0, 2)
    white, black = normalised((255, 255, 255)), normalised((0, 0, 0))
    first, end = rows
    np.testing.assert_allclose(tile[:first], np.broadcast_to(white, tile[:first].shape), atol=1e-6)
    np.testing.assert_allclose(tile[end:], np.broadcast_to(white, tile[end:].shape), atol=1e-6)
    np.testing.assert_allclose(
        tile[first:end], np.broadcast_to(black, tile[first:end].shape), atol=1e-6
    )


@pytest.mark.parametrize("transposed", [False, True])
def test_tiles_come_out_row_major(transposed):
    grid = (3, 2) if transposed else (2, 3)  # 168x112 and 112x168 need no resize at 6 crops
    colours = [
        (40 * r + 20, 60 * c + 10, 200 - 30 * (r * grid[1] + c))
        for r in range(grid[0])
        for c in range(grid[1])
    ]
    pixels = np.zeros((grid[0] * TINY_S, grid[1] * TINY_S, 3), dtype=np.uint8)
    for k, colour in enumerate(colours):
        r, c = divmod(k, grid[1])
        pixels[r * TINY_S : (r + 1) * TINY_S, c * TINY_S : (c + 1) * TINY_S] = colour
    out = hd_transform(Image.fromarray(pixels), 6, TINY_S, tokens_per_side=TINY_T)
    assert (out.h_crop, out.w_crop) == grid
    for k, colour in enumerate(colours):
        expected = np.broadcast_to(normalised(colour), out.crops[1 + k].shape)
        np.testing.assert_allclose(out.crops[1 + k], expected, atol=1e-6)


def test_image_key_and_rgb_conversion():
    image = noise_image(90, 60)
    key = hd_transform(image, 4, TINY_S, tokens_per_side=TINY_T).key
    assert key == hd_transform(image.copy(), 4, TINY_S, tokens_per_side=TINY_T).key
    assert key != hd_transform(image, 1, TINY_S, tokens_per_side=TINY_T).key
    assert key != hd_transform(noise_image(90, 60, seed=1), 4, TINY_S, tokens_per_side=TINY_T).key
    grey = image.convert("L")
    from_grey = hd_transform(grey, 4, TINY_S, tokens_per_side=TINY_T)
    from_rgb = hd_transform(grey.convert("RGB"), 4, TINY_S, tokens_per_side=TINY_T)
    np.testing.assert_array_equal(from_grey.crops, from_rgb.crops)
    rgba = hd_transform(image.convert("RGBA"), 4, TINY_S, tokens_per_side=TINY_T)
    assert rgba.key == key


# --- image feature index ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "h, w, t, offset", [(1, 1, 2, 0), (2, 3, 2, 5), (3, 1, 12, 1), (1, 16, 12, 0)]
)
def test_feature_index_structure(h, w, t, offset):
    index = image_feature_index(h, w, offset, t)
    assert index.dtype == np.int32
    assert len(index) == (h * w + 1) * t * t + 1 + (h + 1) * t
    n_sub = t * h * (t * w + 1)
    sub = index[:n_sub].reshape(t * h, t * w + 1)
    assert index[n_sub] == -2 and np.count_nonzero(index == -2) == 1
    glb = index[n_sub + 1 :].reshape(t, t + 1)
    assert (sub[:, -1] == -1).all() and (glb[:, -1] == -1).all()
    assert np.count_nonzero(index == -1) == t * h + t
    tile_rows = range((offset + 1) * t * t, (offset + 1 + h * w) * t * t)
    assert sorted(sub[:, :-1].ravel().tolist()) == list(tile_rows)
    assert glb[:, :-1].ravel().tolist() == list(range(offset * t * t, (offset + 1) * t * t))


def pool(pixels: np.ndarray, cell: int) -> np.ndarray:
    """Mean over cell x cell pixel blocks: [H, W, C] -> [H/cell, W/cell, C]."""
    rows, cols = pixels.shape[0] // cell, pixels.shape[1] // cell
    return pixels.reshape(rows, cell, cols, cell, -1).mean(axis=(1, 3))


@pytest.mark.parametrize("size", [(200, 130), (130, 200)])
def test_feature_index_rebuilds_the_image(size):
    # A feature table of cell means, with two crops of another image before this one, gathered
    # through the index, must give the cell means of the whole padded image (and global view).
    t, cell = TINY_T, TINY_S // TINY_T
    image = noise_image(*size, seed=3)
    out = hd_transform(image, 6, TINY_S, tokens_per_side=t)
    crops = np.concatenate([np.zeros((2, TINY_S, TINY_S, 3), np.float32), out.crops])
    table = np.stack([pool(crop, cell).reshape(t * t, 3) for crop in crops]).reshape(-1, 3)
    index = image_feature_index(out.h_crop, out.w_crop, 2, t)
    n_sub = t * out.h_crop * (t * out.w_crop + 1)
    sub = index[:n_sub].reshape(t * out.h_crop, -1)[:, :-1]
    whole = reference_padded(image, 6, TINY_S).permute(1, 2, 0).numpy()
    assert whole.shape[:2] == out.padded_size
    np.testing.assert_allclose(table[sub], pool(whole, cell), atol=1e-6)
    glb = index[n_sub + 1 :].reshape(t, t + 1)[:, :-1]
    np.testing.assert_allclose(table[glb], pool(out.crops[0], cell), atol=1e-6)


# --- slot counts agree everywhere -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 2500),
    height=st.integers(1, 2500),
    num_crops=st.sampled_from([1, 4, 16]),
)
def test_slot_count_matches_processor(tokenizer, tiny_model_config, width, height, num_crops):
    proc = Processor(tokenizer, tiny_model_config, num_crops=num_crops)
    image = Image.new("RGB", (width, height), (255, 0, 0))
    row = proc.prepare("Describe the image.", image)
    expected = image_token_count(width, height, num_crops, TINY_S, TINY_T)
    (image_input,) = row.images
    assert (image_input.h_crop, image_input.w_crop) == crop_grid(width, height, num_crops, TINY_S)
    assert sum(1 for i in row.input_ids if i < 0) == expected == image_input.num_tokens
    index = image_feature_index(image_input.h_crop, image_input.w_crop, 0, TINY_T)
    assert len(index) == expected
    assert proc.estimate_tokens("Describe the image.", (width, height)) == len(row.input_ids)


def test_slot_count_matches_processor_at_336(tokenizer):
    proc = Processor(tokenizer, ModelConfig.from_dict({}), num_crops=16)
    row = proc.prepare("Describe the image.", Image.new("RGB", (1000, 333)))
    assert row.images[0].crops.shape[1:] == (336, 336, 3)
    slots = [i for i in row.input_ids if i < 0]
    assert slots == [-1] * image_token_count(1000, 333, 16)


# --- prompts and tokens -----------------------------------------------------------------------


def test_chat_prompt(processor, tokenizer):
    assert processor.chat_prompt("Hi", 0) == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert (
        processor.chat_prompt("Hi", 2)
        == "<|user|>\n<|image_1|>\n<|image_2|>\nHi<|end|>\n<|assistant|>\n"
    )
    # the checkpoint's own template (tokenizer_config.json), which other tools format with
    for images in (0, 2):
        tags = "".join(f"<|image_{k}|>\n" for k in range(1, images + 1))
        messages = [{"role": "user", "content": tags + "Hi"}]
        templated = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert templated == processor.chat_prompt("Hi", images)


def test_tokenize_interleaves_chunks_and_slots(processor, tokenizer):
    text = "<|user|>\n<|image_1|>\na red circle<|image_2|>\nWhat? <|end|>\n<|assistant|>\n"
    ids = processor.tokenize(text, [fake_image(5), fake_image(7)])
    chunks = ["<|user|>\n", "\na red circle", "\nWhat? <|end|>\n<|assistant|>\n"]
    encoded = [tokenizer(chunk)["input_ids"] for chunk in chunks]
    assert ids == encoded[0] + [-1] * 5 + encoded[1] + [-2] * 7 + encoded[2]
    bos = tokenizer.bos_token_id
    first_1, first_2 = ids.index(-1), ids.index(-2)
    assert ids[0] == bos and ids[first_1 + 5] == bos and ids[first_2 + 7] == bos
    assert ids.count(bos) == 3


def test_tokenize_text_only(processor, tokenizer):
    text = processor.chat_prompt("Write a caption.", 0)
    ids = processor.tokenize(text, [])
    assert ids == tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and min(ids) >= 0
    assert processor.prepare("Write a caption.", None).input_ids == ids
    assert processor.estimate_tokens("Write a caption.", None) == len(ids)
    assert processor.prepare(text, None, chat=False).input_ids == ids


def test_prepare_without_chat_uses_the_prompt_as_is(processor):
    image = noise_image(70, 50)
    row = processor.prepare("<|image_1|>caption:", image, chat=False)
    slots = [i for i in row.input_ids if i < 0]
    assert slots == [-1] * row.images[0].num_tokens
    assert processor.estimate_tokens("<|image_1|>caption:", (70, 50), chat=False) == len(
        row.input_ids
    )


@pytest.mark.parametrize(
    "text, num_images, message",
    [
        ("<|image_2|> hi", 1, "the image tag must be <|image_1|>; found <|image_2|>"),
        ("<|image_1|><|image_3|> hi", 2, "in order"),
        ("<|image_2|><|image_1|> hi", 2, "in order"),
        ("<|image_1|><|image_1|> hi", 2, "in order"),
        ("<|image_1|><|image_1|> hi", 1, "2 image tag"),
        ("<|image_1|> hi", 0, "0 image"),
        ("hi", 1, "0 image tag"),
        ("<|image_1|><|image_2|> hi", 1, "1 image"),
    ],
)
def test_bad_image_tags_raise(processor, text, num_images, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        processor.tokenize(text, [fake_image(3)] * num_images)


def test_decode_skips_special_tokens_and_slots(processor, tokenizer):
    ids = [-1, -1] + tokenizer("a red circle<|end|>")["input_ids"]
    assert processor.decode(ids) == "a red circle"


# --- stop ids, pad id, loading ----------------------------------------------------------------


class StubTokenizer:
    """Just what Processor reads at construction: the vocabulary and the pad id."""

    def __init__(self, vocab: dict[str, int], pad_token_id: int | None = None):
        self._vocab = vocab
        self.pad_token_id = pad_token_id

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


def test_stop_ids_by_name_and_config(processor, tokenizer):
    vocab = tokenizer.get_vocab()
    names = {vocab["<|end|>"], vocab["<|endoftext|>"], vocab["</s>"]}
    assert processor.stop_token_ids == names | {2}
    config = ModelConfig.from_dict({"eos_token_id": [7, 9]})
    proc = Processor(StubTokenizer({"<|end|>": 40, "<unk>": 0}), config)
    assert proc.stop_token_ids == {40, 7, 9}  # missing names are skipped, not mapped to <unk>


def test_pad_token_fallbacks():
    config = ModelConfig.from_dict({"eos_token_id": 5, "pad_token_id": 11})
    assert Processor(StubTokenizer({"<|end|>": 40}, pad_token_id=3), config).pad_token_id == 3
    assert Processor(StubTokenizer({"<|end|>": 40}), config).pad_token_id == 11
    no_pad = ModelConfig.from_dict({"eos_token_id": 5})
    assert Processor(StubTokenizer({"<|end|>": 40}), no_pad).pad_token_id == 40
    assert Processor(StubTokenizer({}), no_pad).pad_token_id == 5


def write_model_dir(tokenizer_dir: Path, out: Path, preprocessor: dict, generation: dict | None):
    out.mkdir()
    for path in tokenizer_dir.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    if generation is not None:
        (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def test_from_pretrained_reads_preprocessor_and_generation_config(
    tokenizer_dir, tiny_model_config, tmp_path
):
    config = tiny_model_config
    half = {"num_crops": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    model_dir = write_model_dir(tokenizer_dir, tmp_path / "m", half, {"eos_token_id": [2, 99]})
    proc = Processor.from_pretrained(model_dir, config)
    assert proc.num_crops == 2
    assert 99 in proc.stop_token_ids and 2 in proc.stop_token_ids
    white = proc.prepare("hi", Image.new("RGB", (60, 60), (255, 255, 255))).images[0]
    np.testing.assert_allclose(white.crops, 1.0, atol=1e-6)  # (1 - 0.5) / 0.5
    assert Processor.from_pretrained(model_dir, config, num_crops=1).num_crops == 1

    bare = write_model_dir(tokenizer_dir, tmp_path / "bare", {}, None)
    proc = Processor.from_pretrained(bare, config)
    assert 99 not in proc.stop_token_ids and proc.image_mean == CLIP_MEAN


def test_from_pretrained_on_tiny_model(tiny_model_dir):
    config = ModelConfig.from_dict(json.loads((tiny_model_dir / "config.json").read_text()))
    proc = Processor.from_pretrained(tiny_model_dir, config)
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) <= proc.stop_token_ids
    assert (proc.crop_size, proc.tokens_per_side) == (TINY_S, TINY_T)
    row = proc.prepare("Describe the image.", noise_image(120, 80))
    assert row.images[0].crops.shape[1:] == (TINY_S, TINY_S, 3)
    assert len(row.input_ids) == proc.estimate_tokens("Describe the image.", (120, 80))


def write_phi3_style_tokenizer(out: Path, add_bos_token: bool = True) -> Path:
    """A small tokenizer in the layout of Phi-3's (a Llama-2 style tokenizer.json): byte-fallback
    BPE, a normalizer that prepends "▁" to every piece between special tokens and turns spaces
    into "▁", no pre-tokenizer; ``LlamaTokenizer`` with ``legacy: false`` in tokenizer_config."""
    out.mkdir()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for char in "▁" + "".join(sorted(set("Describetheimage.Whatisit?"))):
        vocab.setdefault(char, len(vocab))
    specials = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    added = [
        {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False}
        | {"normalized": False, "special": True}
        for i, name in [(0, "<unk>"), (1, "<s>"), (2, "</s>")]
        + [(len(vocab) + k, name) for k, name in enumerate(specials)]
    ]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}]
            + [bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": vocab,
            "merges": [],
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tokenizer_config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "tokenizer_class": "LlamaTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out


def test_phi3_tokenizer_encodes_as_its_tokenizer_json(tmp_path, tiny_model_config):
    """The reference (transformers 4) encodes with Phi-3's tokenizer.json as it is: every piece
    between special tokens gets a "▁", so "<|user|>\\n" is <|user|> ▁ \\n (32010, 29871, 13 in the
    real vocabulary). transformers 5 rebuilds a LlamaTokenizer's pre-tokenizer and would drop
    those "▁"; the processor must keep the file's pipeline."""
    from tokenizers import Tokenizer

    folder = write_phi3_style_tokenizer(tmp_path / "phi3-tok")
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    proc = Processor.from_pretrained(folder, tiny_model_config, num_crops=1)
    vocab = proc.tokenizer.get_vocab()
    space, newline = vocab["▁"], vocab["<0x0A>"]

    text = proc.chat_prompt("What is it?", 0)
    ids = proc.prepare("What is it?", None).input_ids
    assert ids == raw.encode(text).ids
    user, end, assistant = (vocab[t] for t in ("<|user|>", "<|end|>", "<|assistant|>"))
    assert ids[:4] == [1, user, space, newline]
    assert ids[-6:] == [end, space, newline, assistant, space, newline]

    row = proc.prepare("Describe the image.", noise_image(60, 40))
    chunks = re.split(r"<\|image_\d+\|>", proc.chat_prompt("Describe the image.", 1))
    slots = [-1] * row.images[0].num_tokens
    assert row.input_ids == raw.encode(chunks[0]).ids + slots + raw.encode(chunks[1]).ids
    assert proc.decode(raw.encode("Describe the image.<|end|>").ids) == "Describe the image."


def test_phi3_tokenizer_without_bos(tmp_path, tiny_model_config):
    folder = write_phi3_style_tokenizer(tmp_path / "phi3-tok", add_bos_token=False)
    proc = Processor.from_pretrained(folder, tiny_model_config, num_crops=1)
    ids = proc.prepare("What is it?", None).input_ids
    assert ids[0] == proc.tokenizer.get_vocab()["<|user|>"]


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grey_images_keep_their_picture(mode):
    """A 16-bit greyscale image (a PNG or TIFF scan) is the picture its 8-bit version is:
    Pillow's RGB conversion clips its values at 255, which made every pixel white."""
    grey = noise_image(90, 60).convert("L")
    values = np.asarray(grey).astype(np.uint16) * 257  # the same picture in 16 bits
    order = ">u2" if mode.endswith("B") else "<u2"
    wide = Image.frombytes(mode, grey.size, values.astype(order).tobytes())
    assert wide.mode == mode
    expected = hd_transform(grey, 4, TINY_S, tokens_per_side=TINY_T)
    got = hd_transform(wide, 4, TINY_S, tokens_per_side=TINY_T)
    np.testing.assert_array_equal(got.crops, expected.crops)
    assert got.key == expected.key


def test_16_bit_png_opened_in_mode_i_keeps_its_picture():
    """Pillow before 13 opens a 16-bit greyscale PNG in mode I (32-bit): the same picture."""
    grey = noise_image(90, 60).convert("L")
    wide = Image.fromarray(np.asarray(grey).astype(np.int32) * 257)
    assert wide.mode == "I"
    wide.format = "PNG"  # as Image.open of such a file sets it
    expected = hd_transform(grey, 4, TINY_S, tokens_per_side=TINY_T)
    got = hd_transform(wide, 4, TINY_S, tokens_per_side=TINY_T)
    np.testing.assert_array_equal(got.crops, expected.crops)
