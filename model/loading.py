"""Load a Phi-3-V model and its processor from a local directory or a Hugging Face hub id.

Hub ids go through ``huggingface_hub.snapshot_download`` (``HF_HUB_OFFLINE=1`` uses only the
cache). Both the original Microsoft checkpoints and MLX-converted ones (channels-last conv,
quantized modules carrying ``.scales``/``.biases``) load through one ``sanitize``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig
from .generate import device_memory_bytes, weight_bytes
from .phi3_v import Model, sanitize
from .processing import Processor

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"]


class ModelLoadError(RuntimeError):
    """The model cannot be found or its files do not fit the architecture."""


def resolve_model_path(path_or_hub_id: str, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub id, downloaded or taken from the cache."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path_or_hub_id.startswith((".", "/", "~")) or path_or_hub_id.count("/") > 1:
        raise ModelLoadError(f"model directory not found: {path_or_hub_id}")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return Path(
            snapshot_download(
                path_or_hub_id,
                revision=revision,
                allow_patterns=_HUB_FILES,
                local_files_only=offline,
            )
        )
    except Exception as err:  # the hub client raises many kinds; all mean "not available"
        where = "the local cache (HF_HUB_OFFLINE is set)" if offline else "the cache or the hub"
        raise ModelLoadError(
            f"model {path_or_hub_id!r} is not a local directory (a relative path is taken from "
            "the current folder, or from the job file's folder in a job file) and could not be "
            f"loaded from {where} as a hub id: {type(err).__name__}"
        ) from None


def read_config(model_dir: Path) -> ModelConfig:
    try:
        params = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{model_dir} has no config.json") from None
    try:
        return ModelConfig.from_dict(params)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{model_dir / 'config.json'}: {err}") from None


def read_weights(model_dir: Path) -> dict[str, mx.array]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weight files")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(mx.load(str(file)))
    return weights


def weights_identity(model_dir: Path) -> str:
    """A cheap hash of the weight files: names, sizes, safetensors headers, and three 4 KiB
    samples (start, middle, end) of every tensor's data, so that weights replaced in place
    with the same shapes (a retrained or fine-tuned checkpoint) change it. Reads about 12 KiB
    per tensor, whatever the checkpoint's size."""
    digest = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = f.read(min(size, 64 << 20))
            digest.update(header)
            for start in _sample_offsets(header, 8 + size):
                f.seek(start)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()[:16]


_SAMPLE = 4096


def _offset_pair(span: object) -> bool:
    return isinstance(span, list) and len(span) == 2 and all(isinstance(k, int) for k in span)


def _sample_offsets(header: bytes, data_start: int) -> list[int]:
    """File offsets of each tensor's first, middle and last ``_SAMPLE`` bytes, in file order."""
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []  # not a safetensors header; load reports it
    offsets = set()
    for name, entry in entries.items() if isinstance(entries, dict) else ():
        span = entry.get("data_offsets") if isinstance(entry, dict) else None
        if name == "__metadata__" or not _offset_pair(span):
            continue  # malformed: load reports it
        begin, end = span
        last = max(begin, end - _SAMPLE)
        offsets.update(data_start + k for k in (begin, (begin + last) // 2, last))
    return sorted(offsets)


def _check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}")
    if wrong:
        problems.append(f"tensors of the wrong shape: {', '.join(wrong[:10])}")
    if problems:
        raise ModelLoadError("checkpoint does not fit the config: " + "; ".join(problems))


def default_dtype() -> str:
    """float32 on the CPU; bfloat16 on a GPU."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def _is_decoder_linear(path: str, module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear) or module.weight.shape[-1] % 64:
        return False
    return path.startswith("model.layers.") or path == "lm_head"


# Share of the memory a process may use that expanded weights may take (the KV cache and
# activations need the rest).
EXPAND_MEMORY_SHARE = 0.75


def build_model(
    model_dir: Path,
    dtype: str | None = None,
    quantize: int | None = None,
    expand: bool | None = None,
) -> Model:
    """Build the model from ``config.json`` and the safetensors in ``model_dir``.

    ``expand``: replace quantized layers (a quantized checkpoint's, or ``quantize``'s) by float
    layers that hold the same weights (``expand_quantized``); default: on the CPU, where MLX's
    quantized matmul runs far slower than a float32 one, when the float weights take at most
    ``EXPAND_MEMORY_SHARE`` of the memory. ``model.quantized_on_cpu`` then says what was done:
    "expanded", "kept" (no room), or None (nothing quantized, or not on the CPU)."""
    config = read_config(model_dir)
    model = Model(config)
    weights = sanitize(read_weights(model_dir))
    if config.quantization:
        q = config.quantization
        mode = q.get("mode", "affine")  # mxfp4 and the like: MLX's defaults for the mode
        affine = mode == "affine"
        nn.quantize(
            model,
            group_size=q.get("group_size", 64 if affine else None),
            bits=q.get("bits", 4 if affine else None),
            mode=mode,
            class_predicate=lambda path, _: f"{path}.scales" in weights,
        )
    _check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    weights.clear()  # the model holds them: what quantizing or expanding replaces can go
    target = DTYPES[dtype or default_dtype()]
    model.apply(lambda x: x.astype(target) if mx.issubdtype(x.dtype, mx.floating) else x)
    if quantize:
        if quantize not in (4, 8):
            raise ValueError("quantize must be 4 or 8")
        nn.quantize(model, group_size=64, bits=quantize, class_predicate=_is_decoder_linear)
    model.quantized_on_cpu = None
    if _quantized_modules(model) and (expand or (expand is None and mx.default_device() == mx.cpu)):
        memory = device_memory_bytes()  # unknown: as on most machines, expanded
        if (
            expand
            or memory is None
            or _expanded_bytes(model, target) <= EXPAND_MEMORY_SHARE * memory
        ):
            expand_quantized(model, target)
            model.quantized_on_cpu = "expanded"
        else:
            model.quantized_on_cpu = "kept"
    mx.eval(model.parameters())
    model.eval()
    return model


_QUANTIZED_KINDS = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def _quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the model's quantized linear and embedding layers."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, _QUANTIZED_KINDS)]


def _expanded_bytes(model: nn.Module, dtype: mx.Dtype) -> int:
    """Bytes of the model's parameters once its quantized layers hold float weights."""
    total = weight_bytes(model)
    for _, m in _quantized_modules(model):
        rows, packed = m.weight.shape
        total += rows * packed * 32 // m.bits * dtype.size
        biases = getattr(m, "biases", None)
        total -= m.weight.nbytes + m.scales.nbytes + (0 if biases is None else biases.nbytes)
    return total


def expand_quantized(model: nn.Module, dtype: mx.Dtype) -> None:
    """Replace each quantized linear and embedding layer by a float one of ``dtype`` whose
    weight is the quantized weight dequantized (``mx.dequantize``): the same weights the
    quantized layer computes with, at float speed and float memory."""

    paths = [path for path, _ in _quantized_modules(model)]
    for path in paths:  # one layer at a time: each one's packed weights go as it goes
        *parents, name = path.split(".")
        parent = model
        for key in parents:
            parent = parent[int(key)] if isinstance(parent, list) else parent[key]
        module = parent[int(name)] if isinstance(parent, list) else parent[name]
        if isinstance(parent, list):
            parent[int(name)] = _expanded(module, dtype)
        else:
            setattr(parent, name, _expanded(module, dtype))
        del module


def _expanded(module: nn.Module, dtype: mx.Dtype) -> nn.Module:
    weight = mx.dequantize(
        module.weight,
        module.scales,
        getattr(module, "biases", None),
        module.group_size,
        module.bits,
        mode=getattr(module, "mode", "affine"),
    ).astype(dtype)
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*weight.shape)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight = weight
    mx.eval(layer.parameters())
    return layer


def load(
    path_or_hub_id: str,
    dtype: str | None = None,
    quantize: int | None = None,
    num_crops: int | None = None,
    revision: str | None = None,
) -> tuple[Model, Processor]:
    """Load model and processor.

    Args:
        path_or_hub_id: a local directory in Hugging Face layout, or a hub id.
        dtype: "float32", "bfloat16" or "float16"; default float32 on CPU, bfloat16 on GPU.
        quantize: 4 or 8 to quantize the decoder's linear layers at load (group size 64).
        num_crops: override ``num_crops`` of ``preprocessor_config.json``.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir = resolve_model_path(path_or_hub_id, revision)
    model = build_model(model_dir, dtype, quantize)
    processor = _quietly(Processor.from_pretrained, model_dir, model.config, num_crops=num_crops)
    return model, processor


# Text that exercises what a tokenizer may encode differently: the chat template's special
# tokens and newlines, runs of spaces, a tab, accents, other scripts, an emoji, digits
ENCODING_PROBE = "Probe:  two spaces,\ta tab,\nnew line, ümlaut, 漢字, emoji 🙂, 1234 and  end. "


def encoding_probe(model_dir: Path) -> str | None:
    """A digest of how this model's tokenizer, as the installed libraries load it, encodes a
    chat prompt and decodes it back: the fingerprint holds it, since a library upgrade can
    change the encoding while the model's files stay the same (transformers 5 did for Phi-3's
    tokenizer). None where the tokenizer does not load (``load`` then says why)."""
    try:
        processor = _quietly(Processor.from_pretrained, model_dir, read_config(model_dir))
        ids = processor.prepare(ENCODING_PROBE, None, chat=True).input_ids
        text = processor.decode([i for i in ids if i >= 0])
    except Exception:  # noqa: BLE001 - a model that does not load is reported by its load
        return None
    return hashlib.sha256(json.dumps([ids, text]).encode()).hexdigest()[:16]


def _quietly(func, *args, **kwargs):
    """Call ``func`` with transformers' logging at error level: AutoTokenizer reads config.json
    and warns that it does not know ``phi3_v`` or rope type ``su``, which is harmless here.

    The first import of transformers also prints an advisory that PyTorch was not found (on
    every run, ``--quiet`` included, so in every cron mail): jobrunner never needs PyTorch, so
    advisories are turned off before that import, unless the caller set the variable."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return func(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(previous)
