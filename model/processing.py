"""Images and prompts for Phi-3-Vision: the HD crop transform and image-slot expansion.

Takes PIL images and prompt strings, returns numpy crops and token ids in which image slots are
negative (``-k`` for the k-th image). Knows nothing of the model's weights or of MLX.

The HD transform follows the reference Hugging Face processor step by step (PHI3V.md section 3),
generalised to a crop size ``S`` (336 for ViT-L/14-336) and ``t`` merged cells per crop side (12).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.config import ModelConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# num_crops of the official Phi-3-vision preprocessor_config.json, used when none is given.
DEFAULT_NUM_CROPS = 16
STOP_TOKEN_NAMES = ("<|end|>", "<|endoftext|>", "</s>")
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
_CUBIC_A = -0.75  # torch's bicubic coefficient


def crop_grid(width: int, height: int, num_crops: int, crop_size: int = 336) -> tuple[int, int]:
    """The (h_crop, w_crop) tile grid the HD transform gives an image of this size."""
    plan = _HDPlan.of(width, height, num_crops, crop_size)
    grid = (plan.padded_h // crop_size, plan.new_w // crop_size)
    return grid[::-1] if plan.transposed else grid


def image_token_count(
    width: int, height: int, num_crops: int, crop_size: int = 336, tokens_per_side: int = 12
) -> int:
    """Image slots in the prompt for an image of (width, height) pixels, without decoding it."""
    h_crop, w_crop = crop_grid(width, height, num_crops, crop_size)
    return _slot_count(h_crop, w_crop, tokens_per_side)


def _slot_count(h_crop: int, w_crop: int, t: int) -> int:
    # sub map (t*h rows of t*w cells + newline), glb_GN, global map (t rows of t cells + newline)
    return (h_crop * w_crop + 1) * t * t + 1 + (h_crop + 1) * t


@dataclass(frozen=True)
class _HDPlan:
    """Resize and padding of the HD transform, in landscape terms (after the transpose)."""

    transposed: bool
    new_w: int
    new_h: int
    padded_h: int
    top: int

    @classmethod
    def of(cls, width: int, height: int, num_crops: int, crop_size: int) -> _HDPlan:
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if num_crops < 1:
            raise ValueError(f"num_crops must be at least 1, got {num_crops}")
        transposed = width < height
        ratio = max(width, height) / min(width, height)
        scale = 1  # the most tiles across such that all tiles fit in num_crops
        while scale * math.ceil(scale / ratio) <= num_crops:
            scale += 1
        scale -= 1
        new_w = scale * crop_size
        # The reference truncates; an extreme aspect ratio would truncate to 0 rows: keep one.
        new_h = max(int(new_w / ratio), 1)
        padded_h = math.ceil(new_h / crop_size) * crop_size
        return cls(transposed, new_w, new_h, padded_h, int((padded_h - new_h) / 2))


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """float32 weights of taps -1, 0, +1, +2 for float32 fractional offsets t: [n, 4]."""
    # The offsets are formed in float32 as torch forms them; the cubic is evaluated in float64,
    # which is closer to torch's fused multiply-adds than a float32 evaluation.
    near = np.stack([t, 1 - t], axis=1).astype(np.float64)  # |x| <= 1
    far = np.stack([t + 1, (1 - t) + 1], axis=1).astype(np.float64)  # 1 < |x| < 2
    a = _CUBIC_A
    w_near = ((a + 2) * near - (a + 3)) * near * near + 1
    w_far = ((a * far - 5 * a) * far + 8 * a) * far - 4 * a
    weights = np.stack([w_far[:, 0], w_near[:, 0], w_near[:, 1], w_far[:, 1]], axis=1)
    return weights.astype(np.float32)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float32 [out_size, in_size] matrix of torch's 1-D bicubic resize of float32 data.

    align_corners=False, a=-0.75, no antialias. Taps outside the input are clamped to the border
    pixel; the source coordinate itself is not clamped below (torch does not for cubic).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # torch computes scale * (i + 0.5) - 0.5 in float32 with one fused multiply-add; the float64
    # product of two float32 numbers is exact, so rounding once to float32 reproduces it. A
    # plain float32 evaluation moves downscaling weights by up to 1e-5.
    src = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32)
    base = np.minimum(np.floor(src), np.float32(in_size - 1))
    weights = _cubic_weights(np.clip(src - base, np.float32(0), np.float32(1)))
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.repeat(np.arange(out_size), 4)
    np.add.at(matrix, (rows, taps.ravel()), weights.ravel())
    return matrix


def bicubic_resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize float32 [H, W, C] like torch interpolate(mode='bicubic', align_corners=False)."""
    in_h, in_w, channels = pixels.shape
    rows = bicubic_matrix(in_h, height)
    cols = bicubic_matrix(in_w, width)
    resized = (rows @ pixels.reshape(in_h, in_w * channels)).reshape(height, in_w, channels)
    by_row = resized.transpose(0, 2, 1).reshape(height * channels, in_w)
    out = (by_row @ cols.T).reshape(height, channels, width)
    return np.ascontiguousarray(out.transpose(0, 2, 1), dtype=np.float32)


@dataclass
class ImageInput:
    """One image after the HD transform."""

    crops: np.ndarray  # float32 [1 + h*w, S, S, 3]: global view, then tiles row-major
    h_crop: int
    w_crop: int
    num_tokens: int
    padded_size: tuple[int, int]  # (Hp, Wp) pixels after resize and padding
    key: str  # content hash, for feature caching


def _image_key(rgb: Image.Image, num_crops: int, crop_size: int) -> str:
    digest = hashlib.sha1(rgb.tobytes())
    digest.update(f"|{rgb.width}x{rgb.height}|{num_crops}|{crop_size}".encode())
    return digest.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. A 16-bit greyscale image (``I;16`` modes: PNG and TIFF scans;
    Pillow before 13 opens a 16-bit PNG in mode ``I``) is brought to 8 bits first, its values
    divided by 257 as the 8-bit picture was scaled up: Pillow's own conversion clips them at
    255, which turns nearly every pixel white."""
    sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG")
    if sixteen_bit:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    return image.convert("RGB")


def _resize_and_pad(rgb: Image.Image, num_crops: int, crop_size: int) -> np.ndarray:
    """Steps 1-5 of the HD transform: uint8 [Hp, Wp, 3] with white letterbox padding."""
    plan = _HDPlan.of(rgb.width, rgb.height, num_crops, crop_size)
    if plan.transposed:
        rgb = rgb.transpose(Image.Transpose.TRANSPOSE)
    resized = np.asarray(rgb.resize((plan.new_w, plan.new_h), Image.Resampling.BILINEAR))
    padded = np.full((plan.padded_h, plan.new_w, 3), 255, dtype=np.uint8)
    padded[plan.top : plan.top + plan.new_h] = resized
    return padded.transpose(1, 0, 2) if plan.transposed else padded


def hd_transform(
    image: Image.Image,
    num_crops: int,
    crop_size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    tokens_per_side: int = 12,
) -> ImageInput:
    """Phi-3-V HD transform of one image into a global view and row-major tiles.

    Args:
        image: any PIL image; converted to RGB.
        num_crops: the most tiles the image may be cut into.
        crop_size: side of one crop in pixels (the vision tower's image size).
        mean, std: per-channel normalisation applied after scaling to [0, 1].
        tokens_per_side: merged feature cells per crop side, for the slot count.

    Returns:
        The real crops only (no zero padding crops), NHWC float32, with grid and slot count.
    """
    rgb = to_rgb(image)
    padded = _resize_and_pad(rgb, num_crops, crop_size)
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    # Same float32 operations as torchvision ToTensor + Normalize.
    pixels = (padded.astype(np.float32) / np.float32(255) - mean32) / std32
    height, width = pixels.shape[:2]
    h_crop, w_crop = height // crop_size, width // crop_size
    tiles = pixels.reshape(h_crop, crop_size, w_crop, crop_size, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(h_crop * w_crop, crop_size, crop_size, 3)
    global_view = bicubic_resize(pixels, crop_size, crop_size)
    return ImageInput(
        crops=np.concatenate([global_view[None], tiles], axis=0),
        h_crop=h_crop,
        w_crop=w_crop,
        num_tokens=_slot_count(h_crop, w_crop, tokens_per_side),
        padded_size=(height, width),
        key=_image_key(rgb, num_crops, crop_size),
    )


def _with_newlines(cells: np.ndarray) -> np.ndarray:
    """Append the newline sentinel (-1) to every row of a 2-D map and flatten it."""
    newline = np.full((cells.shape[0], 1), -1, dtype=np.int32)
    return np.concatenate([cells.astype(np.int32), newline], axis=1).ravel()


def image_feature_index(
    h_crop: int, w_crop: int, crop_offset: int, tokens_per_side: int
) -> np.ndarray:
    """Row of the batch's flat feature table for each slot of one image (sub_glb order).

    The table holds the merged features of all crops of the batch, crop c cell (i, j) at row
    ``c*t*t + i*t + j``. Sentinels: -1 is the sub_GN newline, -2 the glb_GN separator.

    Args:
        h_crop, w_crop: the image's tile grid.
        crop_offset: index of the image's global crop in the batch's crop list; tiles follow it.
        tokens_per_side: t, merged cells per crop side.

    Returns:
        int32 [num_tokens].
    """
    t = tokens_per_side
    rows = np.arange(t * h_crop)[:, None]
    cols = np.arange(t * w_crop)[None, :]
    tile = (rows // t) * w_crop + cols // t
    sub = (crop_offset + 1 + tile) * t * t + (rows % t) * t + cols % t
    glb = crop_offset * t * t + np.arange(t * t).reshape(t, t)
    separator = np.array([-2], dtype=np.int32)
    return np.concatenate([_with_newlines(sub), separator, _with_newlines(glb)])


@dataclass
class PreparedRow:
    input_ids: list[int]  # negative ids are image slots
    images: list[ImageInput]
    max_tokens: int | None = None  # the row's own limit, at most the batch's; None: the batch's


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _encode_as_transformers_4(tokenizer: Any, folder: Path) -> None:
    """Make ``tokenizer`` encode as transformers 4, the version the reference remote code runs on,
    does with the same files: with the normalizer, pre-tokenizer and decoder its tokenizer.json
    holds, and for a ``LlamaTokenizer`` (Phi-3-V's class) with BOS/EOS as tokenizer_config.json's
    ``add_bos_token``/``add_eos_token`` say.

    transformers 5 rebuilds a ``LlamaTokenizer``'s pre-tokenizer from ``legacy`` and
    ``add_prefix_space``: a Metaspace that puts "▁" only before the start of the text, where
    Phi-3's tokenizer.json prepends it to every piece between special tokens, so "<|user|>\n"
    would encode as ``<|user|>`` ``\n`` instead of ``<|user|>`` ``▁`` ``\n`` (32010, 29871, 13):
    other prompt ids than the reference feeds the model. It also keeps tokenizer.json's BOS
    template where tokenizer_config.json says ``add_bos_token: false``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_json = folder / "tokenizer.json"
    if backend is None or not tokenizer_json.is_file():
        return
    from tokenizers import Tokenizer

    own = Tokenizer.from_file(str(tokenizer_json))
    backend.normalizer = own.normalizer
    backend.pre_tokenizer = own.pre_tokenizer
    backend.decoder = own.decoder
    settings = _read_json(folder / "tokenizer_config.json")
    if str(settings.get("tokenizer_class", "")).startswith("LlamaTokenizer"):
        for name in ("add_bos_token", "add_eos_token"):
            if name in settings and getattr(tokenizer, name, None) is not None:
                # transformers' setter rebuilds the post-processor (both 4 and 5)
                setattr(tokenizer, name, bool(settings[name]))


class Processor:
    """Tokenizer plus HD transform for one model: prompts and images in, token ids out."""

    def __init__(
        self,
        tokenizer: Any,
        config: ModelConfig,
        num_crops: int | None = None,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ):
        self.tokenizer = tokenizer
        self.num_crops = DEFAULT_NUM_CROPS if num_crops is None else int(num_crops)
        if self.num_crops < 1:
            raise ValueError(f"num_crops must be at least 1, got {self.num_crops}")
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.crop_size = config.vision.image_size
        self.tokens_per_side = config.vision.tokens_per_side
        vocab = tokenizer.get_vocab()
        named = [vocab[name] for name in STOP_TOKEN_NAMES if name in vocab]
        self._stop_order = list(dict.fromkeys(named + config.eos_token_ids))
        self.stop_token_ids: set[int] = set(self._stop_order)
        self._config_pad_id = config.pad_token_id

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: ModelConfig, num_crops: int | None = None
    ) -> Processor:
        """Load the tokenizer and preprocessor settings of a local model directory.

        ``num_crops`` overrides preprocessor_config.json; generation_config.json eos ids, when
        the file exists, join the stop ids.
        """
        from transformers import AutoTokenizer

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        _encode_as_transformers_4(tokenizer, path)
        pre = _read_json(path / "preprocessor_config.json")
        processor = cls(
            tokenizer,
            config,
            num_crops=num_crops if num_crops is not None else pre.get("num_crops"),
            image_mean=pre.get("image_mean", CLIP_MEAN),
            image_std=pre.get("image_std", CLIP_STD),
        )
        generation = _read_json(path / "generation_config.json")
        extra = _as_id_list(generation.get("eos_token_id"))
        processor._stop_order = list(dict.fromkeys(processor._stop_order + extra))
        processor.stop_token_ids.update(extra)
        return processor

    @property
    def pad_token_id(self) -> int:
        """Tokenizer pad id, else config pad_token_id, else the first stop id."""
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        if self._config_pad_id is not None:
            return int(self._config_pad_id)
        if not self._stop_order:
            raise ValueError("no pad token: the tokenizer, config and stop ids define none")
        return self._stop_order[0]

    def chat_prompt(self, prompt: str, num_images: int) -> str:
        """One user turn with the image tags first, then the assistant's turn opened."""
        tags = "".join(f"<|image_{k}|>\n" for k in range(1, num_images + 1))
        return f"<|user|>\n{tags}{prompt}<|end|>\n<|assistant|>\n"

    def tokenize(self, text: str, images: list[ImageInput]) -> list[int]:
        """Token ids of text; tag <|image_k|> becomes [-k] * images[k-1].num_tokens."""
        return self._expand(text, [image.num_tokens for image in images])

    def _expand(self, text: str, slot_counts: list[int]) -> list[int]:
        tags = [int(k) for k in IMAGE_TAG.findall(text)]
        _check_image_tags(tags, len(slot_counts))
        if not tags:
            return list(self.tokenizer(text)["input_ids"])
        # As the reference processor: every chunk is tokenized on its own, so each gets a BOS.
        chunks = IMAGE_TAG.split(text)[::2]
        ids = list(self.tokenizer(chunks[0])["input_ids"])
        for k, chunk in zip(tags, chunks[1:], strict=True):
            ids += [-k] * slot_counts[k - 1]
            ids += self.tokenizer(chunk)["input_ids"]
        return ids

    def prepare(self, prompt: str, image: Image.Image | None, chat: bool = True) -> PreparedRow:
        """Prompt (wrapped in the chat template when chat) and optional image, ready to run."""
        images = [] if image is None else [self.transform(image)]
        text = self.chat_prompt(prompt, len(images)) if chat else prompt
        return PreparedRow(input_ids=self.tokenize(text, images), images=images)

    def transform(self, image: Image.Image) -> ImageInput:
        """The HD transform with this processor's crop settings."""
        return hd_transform(
            image,
            self.num_crops,
            self.crop_size,
            self.image_mean,
            self.image_std,
            self.tokens_per_side,
        )

    def estimate_tokens(
        self, prompt: str, image_size: tuple[int, int] | None, chat: bool = True
    ) -> int:
        """Exact length of ``prepare(prompt, image, chat).input_ids`` from (width, height)."""
        counts = []
        if image_size is not None:
            width, height = image_size
            counts.append(
                image_token_count(
                    width, height, self.num_crops, self.crop_size, self.tokens_per_side
                )
            )
        text = self.chat_prompt(prompt, len(counts)) if chat else prompt
        return len(self._expand(text, counts))

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens and image slots left out."""
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=True)


class ImageTagError(ValueError):
    """The prompt's image tags do not match its images."""


def _check_image_tags(tags: list[int], num_images: int) -> None:
    """Tags must be <|image_1|> ... <|image_n|>, in order, each once, n == number of images.

    Image features are assigned to slots by order, so any other arrangement would silently
    give a slot block another image's features.
    """
    if len(tags) != num_images:
        raise ImageTagError(
            f"the prompt has {len(tags)} image tag(s) but {num_images} image(s) were given"
        )
    expected = list(range(1, num_images + 1))
    if tags != expected:
        found = ", ".join(f"<|image_{k}|>" for k in tags)
        wanted = (
            "the image tag must be <|image_1|>"
            if num_images == 1
            else f"image tags must be <|image_1|> ... <|image_{num_images}|> in order, each once"
        )
        raise ImageTagError(f"{wanted}; found {found}")
