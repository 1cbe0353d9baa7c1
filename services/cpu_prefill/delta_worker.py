"""One CPU prefill process: computes its token slices of the cold segments posted on a ring.

``python -m services.cpu_prefill.delta_worker --ring NAME --index I [--core K]``

It pins itself to core K, runs torch single-threaded, maps the ring and (lazily, by adapter id)
the adapter segments of the worker's host store, and loops: wait for the doorbell (spinning
briefly, then blocking in the futex: an idle process takes no core), then for every slot with
a new sequence number compute this process's token slice of each projection of the posted
input group that the adapter has at that layer, and acknowledge. On CUDA the sequence number
is written by the device stream after the doorbell, so after a doorbell it keeps re-scanning
the slots for ``RESCAN_S`` before blocking again.

It exits when its parent (the pool) or the ring's owner (the gpu_worker) is gone, or on
SIGTERM. An adapter segment it cannot map is skipped without an acknowledgement: the worker's
deadline then falls back to waiting for the load.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections import OrderedDict

import torch

from services.cpu_prefill.lora_slice import lora_slice
from shared.llama_shape import INPUT_GROUPS
from shared.native_ops import cpu_lora_kernel
from shared.shm_exchange import SHM_DIR, AdapterSegment, ExchangeRing, Job, RingMismatchError, adapter_segment_name

log = logging.getLogger("caraserve.cpu_prefill.delta_worker")

SPIN_S = 0.002  # spin this long after work before blocking
BLOCK_S = 0.2  # block at most this long between liveness checks
RESCAN_S = 0.002  # after a doorbell, look for slots whose seq is not yet visible this long
MAX_MAPPED_ADAPTERS = 64
MAX_UNMAPPABLE = 1024  # adapter ids remembered as not mappable (each logged once)


class DeltaWorker:
    """The loop of one CPU process over one ring."""

    def __init__(self, ring: ExchangeRing, index: int) -> None:
        self.ring, self.index = ring, index
        self.handled = [ring.seq(s) for s in range(ring.geometry.num_slots)]  # jobs posted before we came are stale
        self.adapters: OrderedDict[int, AdapterSegment] = OrderedDict()
        self.unmappable: set[int] = set()  # logged already; still retried at each job (the store may add it)
        self.parent = os.getppid()
        self.stop = False
        self.jobs = 0

    def run(self) -> None:
        bell = self.ring.doorbell()
        self.ring.mark_ready(self.index)
        while not self.stop and self._alive():
            rung = self.ring.wait_doorbell(bell, SPIN_S, BLOCK_S)
            if rung == bell:  # idle: a moment to let go of what the worker's host store dropped
                self._drop_unlinked()
            bell = rung
            deadline = time.monotonic() + RESCAN_S
            while self._serve_slots() or time.monotonic() < deadline:
                pass
        self.close()

    def _alive(self) -> bool:
        return os.getppid() == self.parent and self.ring.owner_alive()

    def _serve_slots(self) -> bool:
        """Compute every new job of every slot; True if there was one."""
        served = False
        for slot in range(self.ring.geometry.num_slots):
            seq = self.ring.seq(slot)
            if seq == self.handled[slot]:
                continue
            self.handled[slot] = seq
            job = self.ring.job(slot)
            if job.seq == seq and self._compute(slot, job):
                self.ring.ack(slot, self.index, seq)
                self.jobs += 1
            served = True
        return served

    def _compute(self, slot: int, job: Job) -> bool:
        rows = self.ring.assigned(job, self.index)
        if rows is None:
            return False
        adapter = self._adapter(job.adapter_id)
        if adapter is None:
            return False
        start, end = rows
        x = self.ring.input_view(slot, job.group, job.tokens)[start:end]
        for proj in INPUT_GROUPS[job.group]:
            pair = adapter.weights.get((job.layer, proj))
            if pair is not None:
                lora_slice(x, pair[0], pair[1], self.ring.output_view(slot, proj, job.tokens)[start:end], job.tokens)
        return True

    def _adapter(self, adapter_id: int) -> AdapterSegment | None:
        segment = self.adapters.get(adapter_id)
        if segment is not None:
            self.adapters.move_to_end(adapter_id)
            return segment
        name = adapter_segment_name(self.ring.prefix, adapter_id)
        try:
            segment = AdapterSegment.attach(name)
        except (FileNotFoundError, RingMismatchError, ValueError) as exc:
            if adapter_id not in self.unmappable:  # one line per adapter, not one per layer and group
                log.warning("cpu worker %d: cannot map adapter segment %s (its jobs fall back): %s", self.index,
                            name, exc)
                if len(self.unmappable) >= MAX_UNMAPPABLE:
                    self.unmappable.clear()
                self.unmappable.add(adapter_id)
            return None
        self.unmappable.discard(adapter_id)
        self.adapters[adapter_id] = segment
        while len(self.adapters) > MAX_MAPPED_ADAPTERS:
            self.adapters.popitem(last=False)[1].close()
        return segment

    def _drop_unlinked(self) -> None:
        """Unmap the adapter segments the worker unlinked (evicted from its host store): a mapping
        would otherwise keep their memory alive until the LRU pushed them out."""
        gone = [a for a, seg in self.adapters.items() if not os.path.exists(os.path.join(SHM_DIR, seg.name))]
        for adapter_id in gone:
            self.adapters.pop(adapter_id).close()

    def close(self) -> None:
        for segment in self.adapters.values():
            segment.close()
        self.adapters.clear()
        self.ring.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one CPU prefill process")
    p.add_argument("--ring", required=True, help="the worker's ring segment name")
    p.add_argument("--index", type=int, required=True, help="this process's index in the pool")
    p.add_argument("--core", type=int, default=None, help="pin to this core")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    cpu_lora_kernel()  # built or loaded before this process says it is ready, not at its first job
    try:
        ring = ExchangeRing.attach(args.ring)
    except (FileNotFoundError, RingMismatchError) as exc:
        log.error("cpu worker %d: cannot attach ring %s: %s", args.index, args.ring, exc)
        return 2
    if not 0 <= args.index < ring.geometry.num_cpu_workers:
        log.error("cpu worker index %d outside the ring's %d workers", args.index, ring.geometry.num_cpu_workers)
        ring.close()
        return 2
    worker = DeltaWorker(ring, args.index)
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stop", True))
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
