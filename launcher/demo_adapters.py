"""The demo adapters `caraserve up` serves when no --adapter-dir is given (made once, cached)."""

from __future__ import annotations

from pathlib import Path

from shared.llama_shape import LlamaShape
from shared.model_store import cache_root
from shared.synthetic_adapters import write_adapter

DEMO = {
    "demo-qv-r8": (8, ("q_proj", "v_proj")),
    "demo-attn-r16": (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "demo-all-r64": (64, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


def ensure_demo_adapters(model_dir: Path) -> Path:
    """The adapter root holding the demo adapters for ``model_dir`` (written on first use)."""
    root = cache_root() / "demo-adapters" / Path(model_dir).name
    shape = LlamaShape.from_model_dir(model_dir)
    for seed, (name, (rank, targets)) in enumerate(DEMO.items(), start=1):
        if not (root / name / "adapter_model.safetensors").is_file():
            write_adapter(root / name, shape, rank, targets, seed, Path(model_dir).name, b_std=0.02)
    return root
