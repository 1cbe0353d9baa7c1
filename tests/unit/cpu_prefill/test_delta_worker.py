"""DeltaWorker's loop body in-process: a missing adapter segment is skipped without an acknowledgement
and logged once, a segment that appears later is used, and one the worker unlinked is unmapped."""

from __future__ import annotations

import logging
import uuid

import torch

from services.cpu_prefill.delta_worker import DeltaWorker
from shared.llama_shape import LlamaShape
from shared.shm_exchange import AdapterSegment, ExchangeRing, RingGeometry, segment_prefix

SHAPE = LlamaShape(num_layers=1, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4)


def test_a_missing_adapter_is_logged_once_and_never_acknowledged(caplog):
    owner = ExchangeRing.create(segment_prefix(f"d{uuid.uuid4().hex[:8]}"), RingGeometry(SHAPE, "float32", 4, 1, 1))
    worker = DeltaWorker(ExchangeRing.attach(owner.name), 0)
    gen = torch.Generator().manual_seed(0)
    weights = {(0, "o_proj"): (torch.randn(8, 2, generator=gen), torch.randn(2, 8, generator=gen))}
    segment = None
    try:
        x = torch.randn(3, 8, generator=gen)
        owner.input_view(0, "o", 3).copy_(x)
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                seq = owner.post(0, 0, "o", 1, 3, 1, 0)
                assert worker._serve_slots()
                assert not owner.is_done(0, seq, 1, 0)
        assert len([r for r in caplog.records if "cannot map adapter segment" in r.getMessage()]) == 1
        segment = AdapterSegment.create(owner.prefix, 1, weights)  # the host store adds it: the next job computes
        seq = owner.post(0, 0, "o", 1, 3, 1, 0)
        assert worker._serve_slots() and owner.is_done(0, seq, 1, 0)
        a, b = weights[(0, "o_proj")]
        assert torch.allclose(owner.output_view(0, "o_proj", 3), x @ a @ b, atol=1e-5)
        worker._drop_unlinked()
        assert list(worker.adapters) == [1]  # still in the store: kept mapped
        segment.close()  # the store evicts it (unlinks)
        worker._drop_unlinked()
        assert not worker.adapters
    finally:
        worker.close()
        if segment is not None:
            segment.close()
        owner.close()
