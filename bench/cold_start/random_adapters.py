"""Seeded random LoRA adapters written as PEFT directories, for benchmarks.

Each adapter is a real PEFT directory written by :func:`shared.synthetic_adapters.write_adapter`
(bf16, A ~ N(0, 1/in), B ~ N(0, std^2)): they cost what real adapters of that rank cost, and
they change outputs mildly. A set is generated once into
the user cache (keyed by model, rank, targets, count and seed) and reused.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path


from shared.llama_shape import LlamaShape
from shared.model_store import cache_root
from shared.synthetic_adapters import write_adapter

log = logging.getLogger(__name__)

DONE_MARKER = ".complete.json"


def adapter_names(count: int) -> list[str]:
    return [f"lora-{i:04d}" for i in range(count)]


def ensure_adapters(model_dir: Path, count: int, rank: int, targets: tuple[str, ...], seed: int,
                    progress=None) -> Path:
    """The directory holding ``count`` random adapters for ``model_dir`` (generated on first use)."""
    shape = LlamaShape.from_model_dir(model_dir)
    key = f"{Path(model_dir).name}-r{rank}-{'_'.join(targets)}-n{count}-s{seed}"
    root = cache_root() / "cold-start-adapters" / key
    spec = {"model": Path(model_dir).name, "count": count, "rank": rank, "targets": list(targets), "seed": seed}
    marker = root / DONE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    if root.exists():
        shutil.rmtree(root)
    log.info("generating %d random rank-%d adapters in %s", count, rank, root)
    for i, name in enumerate(adapter_names(count)):
        write_adapter(root / name, shape, rank, targets, seed * 100_003 + i, Path(model_dir).name)
        if progress is not None:
            progress(i + 1, count)
    marker.write_text(json.dumps(spec))
    return root
