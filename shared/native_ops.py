"""Builds and loads the native ops in csrc/ (once per machine, cached).

The CPU kernels (LoRA segments, paged decode attention, the layer's fused elementwise ops, greedy
sampling, decode-sized GEMMs) are compiled on first use with torch's C++ extension builder into
``$CARASERVE_CACHE_DIR/torch_extensions`` (default ``~/.cache/caraserve``).
When no compiler is available, each loader returns None and its callers fall back to their
plain-torch implementations (logged once).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
BLAS_SEGMENT_TOKENS = 32
"""Segments at least this long take the CPU LoRA kernel's two-GEMM path (csrc/lora_cpu.cpp kBlasThreshold)."""
PAIRED_SEGMENT_TOKENS = 16
"""bf16 segments its pair GEMMs take (``long_delta_available``: the batch-reduce GEMM, or the bf16
dot-product GEMM without AMX) do from this length (kPairedThreshold)."""


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


def _headers_digest() -> str:
    """A digest of ``csrc/*.h``: torch's builder hashes only the sources, so a changed header
    reaches the build through a flag that names this digest."""
    digest = hashlib.sha1()
    for header in sorted(CSRC.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:12]


def _build(name: str, source: str, extra_cflags: tuple[str, ...] = ()) -> ModuleType | None:
    """Compile (or load the cached build of) ``csrc/<source>`` as module ``caraserve_<name>``."""
    from torch.utils import cpp_extension

    build_dir = cache_root() / "torch_extensions" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=f"caraserve_{name}",
            sources=[str(CSRC / source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DCARASERVE_HEADERS={_headers_digest()}",
                          *extra_cflags],
            extra_ldflags=_torch_openmp_flags(),
            build_directory=str(build_dir),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as exc:
        log.warning("native %s kernel unavailable, using the torch path: %s", name, str(exc).splitlines()[0])
        return None


@functools.cache
def cpu_lora_kernel() -> ModuleType | None:
    """The compiled ``lora_segments_`` op, or None when it cannot be built here."""
    return _build("lora_cpu", "lora_cpu.cpp")


@functools.cache
def paged_attention_kernel() -> ModuleType | None:
    """The compiled ``paged_decode_attention`` op, or None when it cannot be built here."""
    return _build("paged_attention_cpu", "paged_attention_cpu.cpp")


@functools.cache
def layer_ops_kernel() -> ModuleType | None:
    """The compiled ``rms_norm``, ``add_rms_norm_`` and ``silu_mul`` ops, or None when they cannot be built here."""
    # no fused multiply-adds: each product is rounded as eager torch rounds it
    return _build("layer_ops_cpu", "layer_ops_cpu.cpp", ("-ffp-contract=off",))


@functools.cache
def dense_kernel() -> ModuleType | None:
    """The compiled ``small_batch_linear`` op (and ``packed_blocks``), or None when it cannot be built here."""
    return _build("dense_cpu", "dense_cpu.cpp")


@functools.cache
def greedy_kernel() -> ModuleType | None:
    """The compiled ``greedy_tokens`` op, or None when it cannot be built here."""
    return _build("greedy_cpu", "greedy_cpu.cpp")
