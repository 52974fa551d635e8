"""Process set-up for fast CPU runs on Linux: OpenBLAS before ``mlx.core``, and the allocator.

MLX's CPU backend resolves its BLAS symbols at import time; with OpenBLAS loaded first with
``RTLD_GLOBAL`` its matrix products run about 30x faster than with the reference BLAS. Loading
after ``mlx.core`` is imported has no effect, so call ``load_openblas()`` first thing.

``JOBRUNNER_BLAS`` overrides the search: a path to load, or ``none`` to load nothing.

MLX's CPU backend takes its buffers from ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB, rising only as far as the largest block freed) with fresh mappings, so a prefill's score
matrices and activations page-fault in anew at every call; on the 2-core VM this was measured on,
that tripled the cost of a 30 MB elementwise pass. ``tune_allocator()`` keeps blocks up to 32 MiB
(the most older glibc versions accept) on the heap and freed memory in the process, where the
next call reuses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)
_loaded: list[str] = []  # the path loaded by an earlier call, if any


def _candidates() -> list[str]:
    override = os.environ.get("JOBRUNNER_BLAS", "").strip()
    if override:
        return [] if override.lower() == "none" else [override]
    if not sys.platform.startswith("linux"):
        return []  # macOS MLX uses Accelerate
    found = [path for path in _CANDIDATES if Path(path).exists()]
    name = ctypes.util.find_library("openblas")
    return found + ([name] if name else [])


def load_openblas() -> str | None:
    """Load OpenBLAS globally, once.

    Returns:
        The library path or name that was loaded, or None when none was found or it is disabled.
        An explicit ``JOBRUNNER_BLAS`` path that cannot be loaded raises ``OSError``.
    """
    if _loaded:
        return _loaded[0]
    explicit = bool(os.environ.get("JOBRUNNER_BLAS", "").strip())
    for path in _candidates():
        try:
            library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            if not hasattr(library, "cblas_sgemm"):  # a library, but no BLAS: MLX would not use it
                raise OSError(f"{path} has no cblas_sgemm: it is not a BLAS library")
        except OSError:
            if explicit:
                raise
            continue
        _loaded.append(path)
        return path
    return None


def single_threaded_numpy_blas() -> None:
    """Give numpy's own bundled OpenBLAS one thread.

    The preprocessing threads run many small numpy matrix products (the bicubic global view);
    with numpy's default thread pool each of them spins up threads that fight MLX's BLAS for the
    same cores: 6.1 ms per 112x112 resize instead of 0.6 ms measured on 2 cores. MLX's BLAS is a
    separate library and keeps its threads.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: only a speed matter
        return
    numpy_blas = ThreadpoolController().select(prefix="libscipy_openblas")
    if numpy_blas.lib_controllers:
        numpy_blas.limit(limits=1)


_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep large buffers on glibc's heap and reuse them (see the module docstring).

    Returns:
        True when glibc accepted both settings; False elsewhere (other libcs, macOS).
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
            and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):
        return False


def prepare_process() -> str | None:
    """``load_openblas()`` and ``tune_allocator()``: call before ``mlx.core`` is imported.

    Returns:
        What ``load_openblas()`` returns.
    """
    tune_allocator()
    return load_openblas()
