"""Fixtures for the residency tests: an adapter root of same-shape PEFT adapters on the tiny model.

``residency_root`` holds ``a0``..``a5`` (rank 8 on q_proj and v_proj, made by peft with seeded
random weights) and ``big`` (rank 64 on the same projections: exactly 8x the bytes of a rank-8 one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.gpu_worker.residency.config import ResidencyConfig
from services.gpu_worker.residency.factory import Model, make_residency
from services.gpu_worker.residency.tiered import TieredResidency
from shared.llama_shape import LlamaShape
from tests.tiny_adapters import make_lora_adapter
from shared.tiny_models import load_tiny_base

SMALL = [f"a{i}" for i in range(6)]
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="session")
def residency_root(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("residency_root")
    base = load_tiny_base(tiny_model_dir)
    for i, name in enumerate(SMALL):
        make_lora_adapter(base, root / name, 500 + i, r=8, lora_alpha=16, target_modules=QV)
    make_lora_adapter(base, root / "big", 600, r=64, lora_alpha=64, target_modules=QV)
    return root


@pytest.fixture(scope="session")
def tiny_shape(tiny_model_dir) -> LlamaShape:
    return LlamaShape.from_model_dir(tiny_model_dir)


@pytest.fixture
def make_manager(residency_root, tiny_shape):
    """Build a TieredResidency (float32 on CPU) over ``residency_root``; closed after the test. Adapters
    start on disk (``warm_host`` off) unless a test asks otherwise."""
    made = []

    def build(root: Path | None = None, **config) -> TieredResidency:
        cfg = ResidencyConfig(adapter_dir=str(root or residency_root), **{"load_groups": 1, "warm_host": False, **config})
        manager = make_residency(cfg, Model(tiny_shape, 64, torch.float32, "cpu", 256)).residency
        made.append(manager)
        return manager

    yield build
    for manager in made:
        manager.close()


def small_bytes(shape: LlamaShape, rank: int = 8, dtype_bytes: int = 4) -> int:
    """Bytes of a q,v adapter of ``rank`` on ``shape``."""
    per_layer = sum(rank * (shape.proj_dims(p)[0] + shape.proj_dims(p)[1]) for p in QV)
    return shape.num_layers * per_layer * dtype_bytes
