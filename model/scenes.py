"""Synthetic scenes for the demo model: one or two coloured shapes, with a caption and questions.

Every scene is drawn with PIL from a ``numpy.random.Generator``, so a seed fixes the images and
their texts. The language is small and deterministic, so exact match is a fair measure:

- caption (prompt ``CAPTION_PROMPT``): ``"a red circle"`` or ``"a red circle and an orange star"``,
  the shapes named left to right (top to bottom when they are stacked in a tall image);
- ``"What colour is the circle?"`` -> ``"red"``; ``"How many shapes are there?"`` ->
  ``"one"`` / ``"two"``; ``"Is there a star?"`` -> ``"yes"`` / ``"no"``.

The two shapes of a scene always differ in kind and in colour, so every question has one answer.
Image sizes (40 to 300 pixels a side) and aspect ratios (up to 1:4) vary so that the HD transform
gives different crop grids; backgrounds are neutral, plain or split in two tones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 55, 190),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS = ((250, 250, 250), (222, 222, 222), (240, 230, 205), (205, 220, 235))
OUTLINE = (20, 20, 20)
CAPTION_PROMPT = "Describe the image."
COUNT_PROMPT = "How many shapes are there?"
NUMBERS = ("one", "two")
_SIDE = (40, 300)  # image side range in pixels
_MAX_RATIO = 4.5


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive) of the bounding square


@dataclass
class Scene:
    image: Image.Image
    shapes: tuple[Shape, ...]  # in reading order: left to right, or top to bottom

    @property
    def caption(self) -> str:
        return " and ".join(describe(s.colour, s.kind) for s in self.shapes)

    def questions(self) -> list[tuple[str, str]]:
        """Every (question, answer) pair the scene supports, captions excluded."""
        kinds = {s.kind for s in self.shapes}
        pairs = [(colour_prompt(s.kind), s.colour) for s in self.shapes]
        pairs.append((COUNT_PROMPT, NUMBERS[len(self.shapes) - 1]))
        pairs += [(presence_prompt(k), "yes" if k in kinds else "no") for k in SHAPES]
        return pairs


def describe(colour: str, kind: str) -> str:
    """``"a red circle"``, ``"an orange star"``."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {kind}"


def colour_prompt(kind: str) -> str:
    return f"What colour is the {kind}?"


def presence_prompt(kind: str) -> str:
    return f"Is there a {kind}?"


def _polygon(kind: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if kind == "star":  # five points, inner radius 0.45 of the outer one
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [
            (cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles, strict=True)
        ]
    # cross: a plus sign whose arms are a third of the box wide
    a, b = r / 3, r
    pts = [(a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b)]
    pts += [(-a, -b), (-a, -a), (-b, -a), (-b, a), (-a, a), (-a, b)]
    return [(cx + x, cy + y) for x, y in pts]


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: Shape, rgb: tuple[int, int, int], outline: Any = OUTLINE
) -> None:
    """Fill the shape with ``rgb`` and trace it with a dark outline (a clear, colour-free edge)."""
    width = max(2, round((shape.box[2] - shape.box[0]) / 16))
    if shape.kind == "circle":
        draw.ellipse(shape.box, fill=rgb, outline=outline, width=width)
    elif shape.kind == "square":
        draw.rectangle(shape.box, fill=rgb, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape.kind, shape.box), fill=rgb, outline=outline, width=width)


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): long side 60..300, aspect ratio 1..4.5 either way, short side >= 40."""
    long_side = int(rng.integers(60, _SIDE[1] + 1))
    ratio = math.exp(rng.uniform(0.0, math.log(_MAX_RATIO)))
    short_side = max(_SIDE[0], round(long_side / ratio))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A plain background, or two tones split at a random vertical or horizontal line."""
    first, second = rng.choice(len(BACKGROUNDS), size=2, replace=False)
    image = Image.new("RGB", size, BACKGROUNDS[first])
    if rng.random() < 0.5:
        width, height = size
        draw = ImageDraw.Draw(image)
        if rng.random() < 0.5:
            cut = int(rng.uniform(0.2, 0.8) * width)
            draw.rectangle((cut, 0, width, height), fill=BACKGROUNDS[second])
        else:
            cut = int(rng.uniform(0.2, 0.8) * height)
            draw.rectangle((0, cut, width, height), fill=BACKGROUNDS[second])
    return image


def _place(rng: np.random.Generator, cell: tuple[int, int, int, int]) -> tuple[int, ...]:
    """A square box inside ``cell`` (x0, y0, x1, y1), 45-95% of the cell's shorter side."""
    x0, y0, x1, y1 = cell
    side = max(8, int(rng.uniform(0.45, 0.95) * min(x1 - x0, y1 - y0)))
    left = x0 + int(rng.integers(0, max(1, x1 - x0 - side) + 1))
    top = y0 + int(rng.integers(0, max(1, y1 - y0 - side) + 1))
    return (left, top, left + side - 1, top + side - 1)


def _cells(size: tuple[int, int], count: int) -> list[tuple[int, int, int, int]]:
    """One cell per shape, in reading order: halves along the longer side when two."""
    width, height = size
    margin = max(2, min(width, height) // 20)
    if count == 1:
        return [(margin, margin, width - margin, height - margin)]
    if width >= height:
        mid = width // 2
        return [
            (margin, margin, mid - margin, height - margin),
            (mid + margin, margin, width - margin, height - margin),
        ]
    mid = height // 2
    return [
        (margin, margin, width - margin, mid - margin),
        (margin, mid + margin, width - margin, height - margin),
    ]


def make_scene(rng: np.random.Generator) -> Scene:
    """One random scene: one shape (a third of the time) or two of different kind and colour."""
    size = _image_size(rng)
    count = 1 if rng.random() < 1 / 3 else 2
    kinds = rng.choice(len(SHAPES), size=count, replace=False)
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    names = list(COLOURS)
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    shapes = []
    for kind, colour, cell in zip(kinds, colours, _cells(size, count), strict=True):
        shape = Shape(SHAPES[kind], names[colour], _place(rng, cell))
        jitter = rng.integers(-12, 13, size=3)
        rgb = tuple(
            int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[shape.colour], jitter, strict=True)
        )
        draw_shape(draw, shape, rgb)
        shapes.append(shape)
    return Scene(image=image, shapes=tuple(shapes))


def mask_image(scene: Scene) -> Image.Image:
    """The scene's shapes as masks, for dense training labels: white, with shape k (outline
    included) drawn at 0 in channel k and 255 in the others."""
    image = Image.new("RGB", scene.image.size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for k, shape in enumerate(scene.shapes):
        ink = tuple(0 if c == k else 255 for c in range(3))
        draw_shape(draw, shape, ink, outline=ink)
    return image


def make_scenes(seed: int, count: int) -> list[Scene]:
    """``count`` scenes from ``numpy.random.default_rng(seed)``: same seed, same scenes."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng) for _ in range(count)]


def sample_task(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, answer): the caption half of the time, else a colour, count or presence question."""
    draw = rng.random()
    if draw < 0.5:
        return CAPTION_PROMPT, scene.caption
    if draw < 0.75:
        shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
        return colour_prompt(shape.kind), shape.colour
    if draw < 0.8:
        return COUNT_PROMPT, NUMBERS[len(scene.shapes) - 1]
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    present = any(shape.kind == kind for shape in scene.shapes)
    return presence_prompt(kind), "yes" if present else "no"


def corpus() -> list[str]:
    """Every sentence of the scene language, for training the tokenizer."""
    lines = [CAPTION_PROMPT, COUNT_PROMPT, *NUMBERS, "yes", "no"]
    for kind in SHAPES:
        lines += [colour_prompt(kind), presence_prompt(kind)]
    items = [describe(colour, kind) for colour in COLOURS for kind in SHAPES]
    lines += items
    lines += [f"{a} and {b}" for a in items for b in items if a != b]
    return lines
