"""The bundled demo model really captions: held-out exact match through `jobrunner run`.

This is the end-to-end oracle of the image path: a wrong crop order, separator, placeholder
placement, padding or position id would break the captions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobrunner.cli import main
from model.scenes import CAPTION_PROMPT, make_scenes
from model.train_demo import HELD_OUT_SEED

DEMO = Path(__file__).resolve().parents[1] / "model" / "demo"
HELD_OUT = 200


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Scenes of the held-out seed (never trained on) as PNGs + JSONL, and their captions."""
    root = tmp_path_factory.mktemp("held-out")
    expected, lines = {}, []
    for k, scene in enumerate(make_scenes(HELD_OUT_SEED, HELD_OUT)):
        scene.image.save(root / f"{k:03d}.png")
        lines.append(json.dumps({"id": str(k), "image": f"{k:03d}.png", "prompt": CAPTION_PROMPT}))
        expected[str(k)] = scene.caption
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return root / "rows.jsonl", expected


def captions(source: Path, output: Path, *flags: str) -> dict[str, str]:
    result = CliRunner().invoke(
        main,
        ["run", str(source), "--model", str(DEMO), "--output", str(output), "--quiet",
         "--max-tokens", "24", *flags],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return {r["id"]: r["output"].strip() for r in pq.read_table(output).to_pylist()}


def accuracy(outputs: dict[str, str], expected: dict[str, str]) -> float:
    return sum(outputs[k] == v for k, v in expected.items()) / len(expected)


def test_held_out_captions_batched_single_and_8bit(held_out, tmp_path):
    source, expected = held_out
    batched = captions(source, tmp_path / "b16.parquet", "--batch-size", "16")
    assert accuracy(batched, expected) >= 0.95
    single = captions(source, tmp_path / "b1.parquet", "--batch-size", "1")
    assert single == batched  # batch invariance, row for row
    quantized = captions(source, tmp_path / "q8.parquet", "--batch-size", "16", "--quantize", "8")
    assert accuracy(quantized, expected) >= 0.95
