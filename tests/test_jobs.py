"""The shipped job files stay valid and documented."""

from __future__ import annotations

import re
from pathlib import Path

from jobrunner.spec import FIELD_NAMES, load_job_file

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_example_job_file_documents_every_key():
    text = (JOBS / "captions.example.toml").read_text()
    documented = set(re.findall(r"^#?\s*([a-z_]+) = ", text, flags=re.MULTILINE))
    assert documented == set(FIELD_NAMES)


def test_example_job_file_loads():
    values = load_job_file(JOBS / "captions.example.toml")
    assert values["input"] == JOBS / "photos" / "captions.jsonl"
    assert values["model"] == "microsoft/Phi-3.5-vision-instruct"  # a hub id, left as is


def test_demo_job_points_at_bundled_files():
    values = load_job_file(JOBS / "demo.toml")
    assert values["input"].is_file()
    assert (Path(values["model"]) / "config.json").is_file()
