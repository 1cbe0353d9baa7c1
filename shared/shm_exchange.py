"""The shared-memory exchange between a gpu_worker and its CPU prefill pool (one host).

Two kinds of segment live in ``/dev/shm``, each named after the worker's prefix
``caraserve-<worker id>-<owner pid>`` (:func:`segment_prefix`):

* one :class:`ExchangeRing` per gpu_worker (``<prefix>-ring``): slots that carry a cold
  segment's input activations to the CPU workers and their LoRA deltas back;
* one :class:`AdapterSegment` per adapter in the host store (``<prefix>-a<adapter id>``):
  its weights, which the CPU workers map instead of reading the adapter again.

Ring layout (all int32 words, every block 64-byte aligned)::

    header  | magic | version | layers hidden inter heads kv_heads head_dim | dtype | max_tokens |
            | slots | cpu_workers | owner_pid | doorbell | .. | ready[0] .. ready[W-1] (CPU worker pids) |
    slot i  | seq | layer | group | adapter | tokens | parts | first | ack[0] .. ack[W-1] |
            | input  [max_tokens, max_in]   (activation dtype)                            |
            | output per projection of the posted group: [tokens, out_p] float32 each   |

A step, for one (layer, input group) of a cold segment in slot i:

1. the worker writes the activations, then the header words, then a new ``seq`` (last), and
   rings the ``doorbell`` (a futex word) once for all slots it posted;
2. each CPU worker wakes (it spins for a bounded time after work, then blocks in the futex,
   so an idle pool takes no core), finds slots whose ``seq`` it has not handled, computes
   its token slice (:func:`token_slice` of ``parts`` slices, starting at worker ``first``),
   writes its output rows and then ``ack[w] = seq``, and wakes that word;
3. the worker waits (spin, then futex) until the acks of the ``parts`` workers equal ``seq``.

A stale ack can never pass for a new one: ``seq`` grows per slot and is never 0. Each word
has one writer, and a payload is written before the word that publishes it; this relies on
x86-64 store ordering (TSO). Views are zero-copy (``torch.frombuffer``); nothing is pickled
and the data path allocates nothing.

Segments are plain ``/dev/shm`` files (mode 0600) mapped with ``mmap``, not
``multiprocessing.shared_memory``: Python 3.11's resource tracker would unlink a segment
when any process that merely attached to it exits. Here only the creator unlinks (on
:meth:`close`), and :func:`remove_stale_segments` removes what a killed owner left behind.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from shared.config import require
from shared.llama_shape import INPUT_GROUPS, PROJECTIONS, LlamaShape

MAGIC = 0x43415241  # "CARA"
VERSION = 1
SHM_DIR = "/dev/shm"
ALIGN = 64
GROUP_IDS = tuple(INPUT_GROUPS)
GROUP_OF = {proj: group for group, projs in INPUT_GROUPS.items() for proj in projs}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CODES = {"float32": 1, "bfloat16": 2}
TORCH_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2}

RING_HEADER_WORDS = 16
H_MAGIC, H_VERSION, H_SHAPE, H_DTYPE, H_MAX_TOKENS, H_SLOTS, H_WORKERS, H_OWNER, H_DOORBELL = 0, 1, 2, 8, 9, 10, 11, 12, 13
S_SEQ, S_LAYER, S_GROUP, S_ADAPTER, S_TOKENS, S_PARTS, S_FIRST, S_ACKS = range(8)


class RingMismatchError(ValueError):
    """A segment is not a ring (or an adapter segment) this code can read."""


# ---- names and lifetime ------------------------------------------------------------------
def segment_prefix(worker_id: str, pid: int | None = None) -> str:
    """``caraserve-<worker id>-<owner pid>``: every segment of one worker process starts with it."""
    return f"caraserve-{worker_id}-{pid or os.getpid()}"


def ring_name(prefix: str) -> str:
    """The name of the worker's ring segment."""
    return f"{prefix}-ring"


def adapter_segment_name(prefix: str, adapter_id: int) -> str:
    """The name of adapter ``adapter_id``'s segment in the worker's host store."""
    return f"{prefix}-a{adapter_id}"


def _is_segment_suffix(suffix: str) -> bool:
    """True for ``ring`` and ``a<digits>``: what follows ``<prefix>-`` in a segment name."""
    return suffix == "ring" or (suffix[:1] == "a" and suffix[1:].isdigit())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_segments(worker_id: str) -> list[str]:
    """Unlink every ``caraserve-<worker_id>-<pid>-*`` segment whose pid is not a live process.

    The name must be exactly ``<head><pid>-ring`` or ``<head><pid>-a<id>``, so worker ``w`` never
    takes worker ``w-2``'s ``caraserve-w-2-<pid>-ring`` for a segment of pid 2. Returns the names removed.
    """
    head = f"caraserve-{worker_id}-"
    removed = []
    for name in sorted(os.listdir(SHM_DIR)):
        pid, dash, suffix = name[len(head):].partition("-") if name.startswith(head) else ("", "", "")
        if not (dash and pid.isdigit() and _is_segment_suffix(suffix)) or _pid_alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


class _Segment:
    """One ``/dev/shm`` file mapped read-write; the creator unlinks it on close."""

    def __init__(self, name: str, size: int | None) -> None:
        self.name, self.owner = name, size is not None
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if self.owner else 0), 0o600)
        try:
            if self.owner:
                os.ftruncate(fd, size)
            self.size = os.fstat(fd).st_size
            if self.size < ALIGN:
                raise RingMismatchError(f"{name} is {self.size} bytes: not a CaraServe segment")
            self.map = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            if self.owner:
                os.unlink(path)
            raise
        os.close(fd)
        self.closed = False

    def close(self) -> None:
        """Unmap (when no view is left) and, for the creator, unlink. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with its last reference


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _cuda_register(buffer: mmap.mmap, size: int) -> int | None:
    """Page-lock ``buffer`` for asynchronous device copies; returns its address, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    torch.cuda.cudart().cudaHostRegister(address, size, 0)
    return address


def _cuda_unregister(address: int | None) -> None:
    if address is not None:
        torch.cuda.cudart().cudaHostUnregister(address)


# ---- futex -------------------------------------------------------------------------------
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine(), 202)
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(address: int, expected: int, timeout_s: float) -> None:
    """Sleep while the int32 at ``address`` equals ``expected``, at most ``timeout_s`` (shared futex)."""
    timeout_s = max(0.0, timeout_s)
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAIT),
                  ctypes.c_int(expected), ctypes.byref(ts), None, ctypes.c_int(0))


def futex_wake(address: int) -> None:
    """Wake every waiter on the int32 at ``address``."""
    _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAKE),
                  ctypes.c_int(2 ** 31 - 1), None, None, ctypes.c_int(0))


# ---- geometry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RingGeometry:
    """The shapes a ring is laid out for."""

    shape: LlamaShape
    dtype: str  # the activations' dtype
    max_tokens: int  # tokens per slot
    num_slots: int
    num_cpu_workers: int

    def __post_init__(self) -> None:
        require(self.dtype in DTYPES, f"ring dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        require(self.max_tokens >= 1, "max_tokens must be >= 1")
        require(1 <= self.num_slots <= 256, "num_slots must be in [1, 256]")
        require(1 <= self.num_cpu_workers <= 256, "num_cpu_workers must be in [1, 256]")

    def in_features(self, group: str) -> int:
        return self.shape.proj_dims(INPUT_GROUPS[group][0])[0]

    def out_features(self, proj: str) -> int:
        return self.shape.proj_dims(proj)[1]

    @property
    def max_in(self) -> int:
        return max(self.in_features(g) for g in INPUT_GROUPS)

    @property
    def max_group_out(self) -> int:
        return max(sum(self.out_features(p) for p in projs) for projs in INPUT_GROUPS.values())

    def describe(self) -> str:
        s = self.shape
        return (f"layers {s.num_layers}, hidden {s.hidden_size}, intermediate {s.intermediate_size}, heads "
                f"{s.num_heads}/{s.num_kv_heads} x {s.head_dim}, {self.dtype}, {self.num_slots} slots of "
                f"{self.max_tokens} tokens, {self.num_cpu_workers} CPU workers")

    def words(self) -> list[int]:
        s = self.shape
        return [s.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads, s.head_dim,
                DTYPE_CODES[self.dtype], self.max_tokens, self.num_slots, self.num_cpu_workers]

    @classmethod
    def from_words(cls, words: list[int]) -> "RingGeometry":
        shape = LlamaShape(*words[:6])
        dtype = {v: k for k, v in DTYPE_CODES.items()}.get(words[6])
        if dtype is None:
            raise RingMismatchError(f"unknown activation dtype code {words[6]}")
        return cls(shape, dtype, *words[7:10])


@dataclass(frozen=True)
class Job:
    """What a slot's header says: one cold segment for one (layer, input group)."""

    seq: int
    layer: int
    group: str
    adapter_id: int
    tokens: int
    parts: int
    first_worker: int


def token_slice(tokens: int, parts: int, index: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of slice ``index`` when ``tokens`` rows are cut into ``parts`` near-equal slices."""
    return tokens * index // parts, tokens * (index + 1) // parts


# ---- the ring ----------------------------------------------------------------------------
class ExchangeRing:
    """One worker's ring of slots (see the module docstring for the layout and protocol)."""

    def __init__(self, segment: _Segment, geometry: RingGeometry, pinned: int | None = None) -> None:
        self._segment, self.geometry, self._pinned = segment, geometry, pinned
        self.name = segment.name
        self.prefix = self.name[: -len("-ring")]
        g = geometry
        self._ring_header = self._header_bytes(g)
        self._slot_header = _align((S_ACKS + g.num_cpu_workers) * 4)
        self._in_bytes = _align(g.max_tokens * g.max_in * DTYPES[g.dtype].itemsize)
        self._out_bytes = _align(g.max_tokens * g.max_group_out * 4)
        self._stride = self._slot_header + self._in_bytes + self._out_bytes
        buf = segment.map
        self._header = np.ndarray((RING_HEADER_WORDS + g.num_cpu_workers,), np.int32, buf, 0)
        self._slots = [np.ndarray((S_ACKS + g.num_cpu_workers,), np.int32, buf, self._slot_offset(i))
                       for i in range(g.num_slots)]
        self._base = self._header.ctypes.data
        self._inputs = [torch.frombuffer(buf, dtype=DTYPES[g.dtype], count=g.max_tokens * g.max_in,
                                         offset=self._slot_offset(i) + self._slot_header) for i in range(g.num_slots)]
        self._outputs = [torch.frombuffer(buf, dtype=torch.float32, count=g.max_tokens * g.max_group_out,
                                          offset=self._slot_offset(i) + self._slot_header + self._in_bytes)
                         for i in range(g.num_slots)]
        self._seq_tensors = [torch.frombuffer(buf, dtype=torch.int32, count=1, offset=self._slot_offset(i))
                             for i in range(g.num_slots)]

    @staticmethod
    def _header_bytes(geometry: RingGeometry) -> int:
        return _align((RING_HEADER_WORDS + geometry.num_cpu_workers) * 4)

    @classmethod
    def nbytes(cls, geometry: RingGeometry) -> int:
        g = geometry
        slot = (_align((S_ACKS + g.num_cpu_workers) * 4) + _align(g.max_tokens * g.max_in * DTYPES[g.dtype].itemsize)
                + _align(g.max_tokens * g.max_group_out * 4))
        return cls._header_bytes(g) + g.num_slots * slot

    def _slot_offset(self, slot: int) -> int:
        return self._ring_header + slot * self._stride

    @classmethod
    def create(cls, prefix: str, geometry: RingGeometry, pin: bool = False) -> "ExchangeRing":
        """Create the ring ``<prefix>-ring`` (the worker side owns and unlinks it)."""
        segment = _Segment(ring_name(prefix), cls.nbytes(geometry))
        header = np.ndarray((RING_HEADER_WORDS,), np.int32, segment.map, 0)
        header[H_SHAPE:H_SHAPE + 10] = geometry.words()
        header[H_OWNER] = os.getpid()
        header[H_VERSION] = VERSION
        header[H_MAGIC] = MAGIC
        del header
        pinned = _cuda_register(segment.map, segment.size) if pin else None
        return cls(segment, geometry, pinned)

    @classmethod
    def attach(cls, name: str) -> "ExchangeRing":
        """Map an existing ring (the pool side); RingMismatchError if it is not one this code reads."""
        segment = _Segment(name, None)
        try:
            header = np.ndarray((RING_HEADER_WORDS,), np.int32, segment.map, 0).tolist()
            if header[H_MAGIC] != MAGIC or header[H_VERSION] != VERSION:
                raise RingMismatchError(f"{name} is not a version-{VERSION} CaraServe ring (magic {header[H_MAGIC]:#x}, "
                                        f"version {header[H_VERSION]})")
            geometry = RingGeometry.from_words(header[H_SHAPE:H_SHAPE + 10])
            if segment.size < cls.nbytes(geometry):
                raise RingMismatchError(f"{name} is {segment.size} bytes, smaller than its geometry needs")
        except BaseException:
            segment.close()
            raise
        return cls(segment, geometry)

    @property
    def owner_pid(self) -> int:
        return int(self._header[H_OWNER])

    def owner_alive(self) -> bool:
        """Whether the process that created the ring (its gpu_worker) still runs."""
        return _pid_alive(self.owner_pid)

    def close(self) -> None:
        """Drop the views, unmap and (creator only) unlink. Idempotent."""
        if self._segment.closed:
            return
        _cuda_unregister(self._pinned)
        self._header = self._slots = self._inputs = self._outputs = self._seq_tensors = None  # type: ignore[assignment]
        self._segment.close()

    # ---- worker side ----
    def input_view(self, slot: int, group: str, tokens: int) -> torch.Tensor:
        """``[tokens, in_features(group)]`` rows of ``slot``'s input area."""
        width = self.geometry.in_features(group)
        return self._inputs[slot][: tokens * width].view(tokens, width)

    def output_view(self, slot: int, proj: str, tokens: int) -> torch.Tensor:
        """``[tokens, out_features(proj)]`` float32 deltas of ``proj`` in ``slot`` (for its posted group)."""
        group = INPUT_GROUPS[GROUP_OF[proj]]
        start = self.geometry.max_tokens * sum(self.geometry.out_features(p) for p in group[:group.index(proj)])
        width = self.geometry.out_features(proj)
        return self._outputs[slot][start:start + tokens * width].view(tokens, width)

    def seq_view(self, slot: int) -> torch.Tensor:
        """``[1]`` int32 view of ``slot``'s seq word (the device stream writes it on CUDA)."""
        return self._seq_tensors[slot]

    def post(self, slot: int, layer: int, group: str, adapter_id: int, tokens: int, parts: int, first_worker: int,
             publish: bool = True) -> int:
        """Write ``slot``'s job header, then (``publish``) its new seq, last; returns that seq."""
        words = self._slots[slot]
        seq = int(words[S_SEQ]) % (2 ** 31 - 1) + 1
        words[S_LAYER:S_ACKS] = (layer, GROUP_IDS.index(group), adapter_id, tokens, parts, first_worker)
        if publish:
            words[S_SEQ] = seq
        return seq

    def ring_doorbell(self) -> None:
        """Tell every CPU worker that slots were posted."""
        self._header[H_DOORBELL] = (int(self._header[H_DOORBELL]) + 1) % (2 ** 31)
        futex_wake(self._base + 4 * H_DOORBELL)

    def _ack_address(self, slot: int, worker: int) -> int:
        return self._base + self._slot_offset(slot) + 4 * (S_ACKS + worker)

    def is_done(self, slot: int, seq: int, parts: int, first_worker: int) -> bool:
        words, w = self._slots[slot], self.geometry.num_cpu_workers
        return all(words[S_ACKS + (first_worker + j) % w] == seq for j in range(parts))

    def wait_done(self, slot: int, seq: int, parts: int, first_worker: int, deadline: float,
                  spin_s: float = 200e-6) -> bool:
        """Wait until the ``parts`` CPU workers acknowledged ``seq`` in ``slot``; False at ``deadline``."""
        spin_until = time.monotonic() + spin_s
        words, w = self._slots[slot], self.geometry.num_cpu_workers
        while True:
            # the value seen is the one the futex waits on: an ack written after this read wakes it
            missing = next(((k, seen) for k in ((first_worker + j) % w for j in range(parts))
                            if (seen := int(words[S_ACKS + k])) != seq), None)
            if missing is None:
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= spin_until:
                futex_wait(self._ack_address(slot, missing[0]), missing[1], min(deadline - now, 0.05))

    # ---- CPU worker side ----
    def doorbell(self) -> int:
        return int(self._header[H_DOORBELL])

    def wait_doorbell(self, last: int, spin_s: float, block_s: float) -> int:
        """The doorbell once it differs from ``last`` (spin, then block), or ``last`` after ``block_s``."""
        spin_until = time.monotonic() + spin_s
        while time.monotonic() < spin_until:
            if self._header[H_DOORBELL] != last:
                return self.doorbell()
        futex_wait(self._base + 4 * H_DOORBELL, last, block_s)
        return self.doorbell()

    def seq(self, slot: int) -> int:
        return int(self._slots[slot][S_SEQ])

    def mark_ready(self, worker_index: int) -> None:
        """CPU worker ``worker_index`` is attached and serving (its pid in the ready word)."""
        self._header[RING_HEADER_WORDS + worker_index] = os.getpid()

    def ready_pids(self) -> list[int]:
        """The pid each CPU worker last marked ready with (0: none yet)."""
        return self._header[RING_HEADER_WORDS:].tolist()

    def job(self, slot: int) -> Job:
        seq, layer, group, adapter, tokens, parts, first = self._slots[slot][:S_ACKS].tolist()
        return Job(seq, layer, GROUP_IDS[group % len(GROUP_IDS)], adapter, tokens, parts, first)

    def assigned(self, job: Job, worker_index: int) -> tuple[int, int] | None:
        """The token slice CPU worker ``worker_index`` computes for ``job``, or None."""
        j = (worker_index - job.first_worker) % self.geometry.num_cpu_workers
        if j >= job.parts:
            return None
        return token_slice(job.tokens, job.parts, j)

    def ack(self, slot: int, worker_index: int, seq: int) -> None:
        self._slots[slot][S_ACKS + worker_index] = seq
        futex_wake(self._ack_address(slot, worker_index))


# ---- adapter segments --------------------------------------------------------------------
ADAPTER_HEADER_WORDS = 4  # int64: magic, version, count, dtype code
ADAPTER_ROW = 7  # int64: layer, projection index, rank, in, out, offset A, offset B


def _check_rows(name: str, rows: list[list[int]], itemsize: int, size: int) -> None:
    """RingMismatchError unless every row names a projection and its A and B lie inside the segment."""
    for layer, proj, rank, width_in, width_out, a_off, b_off in rows:
        fits = all(0 <= off and off + n * itemsize <= size
                   for off, n in ((a_off, width_in * rank), (b_off, rank * width_out)))
        if not (0 <= proj < len(PROJECTIONS) and min(layer, rank, width_in, width_out) >= 0 and fits):
            raise RingMismatchError(f"{name} has a corrupt table row {(layer, proj, rank, width_in, width_out)}")


class AdapterSegment:
    """An adapter's weights (A ``[in, r]``, B ``[r, out]`` per (layer, projection)) in shared memory."""

    def __init__(self, segment: _Segment, adapter_id: int, weights: dict, pinned: int | None = None) -> None:
        self._segment, self.adapter_id, self.weights, self._pinned = segment, adapter_id, weights, pinned
        self.name = segment.name
        self.nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.values())

    @classmethod
    def create(cls, prefix: str, adapter_id: int, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
               pin: bool = False) -> "AdapterSegment":
        """Copy ``weights`` (one dtype) once into a new segment; ``.weights`` are views of it."""
        dtype = next(iter(weights.values()))[0].dtype if weights else torch.float32
        keys = sorted(weights)
        table_bytes = _align((ADAPTER_HEADER_WORDS + ADAPTER_ROW * len(keys)) * 8)
        rows, offset = [], table_bytes
        for layer, proj in keys:
            a, b = weights[(layer, proj)]
            a_off, offset = offset, offset + _align(a.numel() * a.element_size())
            b_off, offset = offset, offset + _align(b.numel() * b.element_size())
            rows.append((layer, PROJECTIONS.index(proj), a.shape[1], a.shape[0], b.shape[1], a_off, b_off))
        segment = _Segment(adapter_segment_name(prefix, adapter_id), max(offset, ALIGN))
        table = np.ndarray((ADAPTER_HEADER_WORDS + ADAPTER_ROW * len(keys),), np.int64, segment.map, 0)
        table[ADAPTER_HEADER_WORDS:] = np.asarray(rows, dtype=np.int64).reshape(-1)
        table[:ADAPTER_HEADER_WORDS] = (MAGIC, VERSION, len(keys), TORCH_DTYPE_CODES[dtype])
        del table
        views = cls._views(segment, rows, dtype)
        for key in keys:
            views[key][0].copy_(weights[key][0])
            views[key][1].copy_(weights[key][1])
        pinned = _cuda_register(segment.map, segment.size) if pin else None
        return cls(segment, adapter_id, views, pinned)

    @staticmethod
    def _views(segment: _Segment, rows, dtype: torch.dtype) -> dict:
        views = {}
        for layer, proj, rank, width_in, width_out, a_off, b_off in rows:
            a = torch.frombuffer(segment.map, dtype=dtype, count=width_in * rank, offset=a_off).view(width_in, rank)
            b = torch.frombuffer(segment.map, dtype=dtype, count=rank * width_out, offset=b_off).view(rank, width_out)
            views[(int(layer), PROJECTIONS[proj])] = (a, b)
        return views

    @classmethod
    def attach(cls, name: str) -> "AdapterSegment":
        """Map an adapter segment (the pool side); RingMismatchError if it is not one."""
        segment = _Segment(name, None)
        try:
            head = np.ndarray((ADAPTER_HEADER_WORDS,), np.int64, segment.map, 0).tolist()
            if head[0] != MAGIC or head[1] != VERSION:
                raise RingMismatchError(f"{name} is not a version-{VERSION} CaraServe adapter segment")
            dtype = {v: k for k, v in TORCH_DTYPE_CODES.items()}.get(head[3])
            if dtype is None or not 0 <= head[2] <= (segment.size // 8 - ADAPTER_HEADER_WORDS) // ADAPTER_ROW:
                raise RingMismatchError(f"{name} has a corrupt header (count {head[2]}, dtype code {head[3]})")
            table = np.ndarray((ADAPTER_HEADER_WORDS + ADAPTER_ROW * head[2],), np.int64, segment.map, 0)
            rows = table[ADAPTER_HEADER_WORDS:].reshape(-1, ADAPTER_ROW).tolist()
            del table
            _check_rows(name, rows, dtype.itemsize, segment.size)
        except BaseException:
            segment.close()
            raise
        adapter_id = int(name.rsplit("-a", 1)[1])
        return cls(segment, adapter_id, cls._views(segment, rows, dtype))

    def close(self) -> None:
        """Drop the views, unmap and (creator only) unlink. Idempotent."""
        if self._segment.closed:
            return
        _cuda_unregister(self._pinned)
        self.weights = {}
        self._segment.close()
