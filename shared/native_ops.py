"""Builds and loads the native ops in csrc/ (once per machine, cached).

The CPU LoRA kernel is compiled on first use with torch's C++ extension builder
into ``$CARASERVE_CACHE_DIR/torch_extensions`` (default ``~/.cache/caraserve``).
When no compiler is available, :func:`cpu_lora_kernel` returns None and callers
fall back to the plain-torch implementation (logged once).
"""

from __future__ import annotations

import functools
import glob
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
BLAS_SEGMENT_TOKENS = 32
"""Segments at least this long go to BLAS in the CPU LoRA kernel (csrc/lora_cpu.cpp kBlasThreshold)."""


def cache_root() -> Path:
    return Path(os.environ.get("CARASERVE_CACHE_DIR", Path.home() / ".cache" / "caraserve"))


def _torch_openmp_flags() -> list[str]:
    """Link against torch's own OpenMP runtime so one thread pool serves both."""
    import torch

    libdir = Path(torch.__file__).parent / "lib"
    bundled = sorted(glob.glob(str(libdir / "libgomp*.so*")))
    if bundled:
        return [bundled[0], f"-Wl,-rpath,{libdir}"]
    return ["-fopenmp"]


@functools.cache
def cpu_lora_kernel() -> ModuleType | None:
    """The compiled ``lora_segments_`` op, or None when it cannot be built here."""
    from torch.utils import cpp_extension

    build_dir = cache_root() / "torch_extensions" / "lora_cpu"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name="caraserve_lora_cpu",
            sources=[str(CSRC / "lora_cpu.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=_torch_openmp_flags(),
            build_directory=str(build_dir),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as exc:
        log.warning("native CPU LoRA kernel unavailable, using the torch path: %s", str(exc).splitlines()[0])
        return None
