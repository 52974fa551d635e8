"""Shared fixtures: tiny random Phi-3-V model directories, built once per test session.

OpenBLAS is loaded (and the allocator tuned) before anything imports ``mlx.core`` (see
``jobrunner/_blas.py``).
All model fixtures use seed 0, so they hold the same weights in different layouts.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo is not installed in the test venv
    sys.path.insert(0, str(ROOT))

from jobrunner._blas import prepare_process  # noqa: E402

prepare_process()

import pytest  # noqa: E402

from model.tiny import build_tokenizer, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF layout, one ``model.safetensors``."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-hf"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF layout in 3 shards + index, with the old CLIP ``position_ids`` buffer loaders drop."""
    out = tmp_path_factory.mktemp("tiny-hf-sharded")
    return make_tiny_model(out, seed=0, shards=3, with_position_ids=True)


@pytest.fixture(scope="session")
def tiny_model_dir_mlx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLX layout: patch conv OHWI, no position_ids, ``{"format": "mlx"}`` metadata."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-mlx"), seed=0, layout="mlx")


@pytest.fixture(scope="session")
def tiny_model_dir_q4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLX layout with 4-bit (group 64) decoder linears and ``config["quantization"]``."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-q4"), seed=0, layout="mlx-q4")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the tokenizer files (the same tokenizer the model fixtures hold)."""
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(out)
    return out
