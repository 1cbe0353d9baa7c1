"""Paged KV cache: a block manager (accounting) and the cache tensors (storage).

Blocks of ``block_size`` token slots are handed to sequences on demand. A sequence's
block table maps its token positions to slots: position ``p`` lives in slot
``table[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

import math
import mmap
from collections import deque

import torch


class BlockManager:
    """Allocates KV blocks to sequences; predicate/action pairs as in nano-vllm."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Could a new sequence of ``num_tokens`` tokens get its blocks now?"""
        return self.blocks_needed(num_tokens) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Give ``seq_id`` blocks for ``num_tokens`` tokens (check :meth:`can_allocate` first)."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        need = self.blocks_needed(num_tokens)
        if need > len(self._free):
            raise MemoryError(f"{need} KV blocks needed, {len(self._free)} free")
        self.tables[seq_id] = [self._free.popleft() for _ in range(need)]
        return self.tables[seq_id]

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        """Can ``seq_id`` grow to ``num_tokens`` tokens?"""
        extra = self.blocks_needed(num_tokens) - len(self.tables[seq_id])
        return extra <= len(self._free)

    def append(self, seq_id: str, num_tokens: int) -> None:
        """Grow ``seq_id``'s table to cover ``num_tokens`` tokens."""
        table = self.tables[seq_id]
        while len(table) < self.blocks_needed(num_tokens):
            if not self._free:
                raise MemoryError("no free KV blocks")
            table.append(self._free.popleft())

    def free(self, seq_id: str) -> None:
        """Return all of ``seq_id``'s blocks (no-op for an unknown sequence)."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self._free.appendleft(block)  # reused first: the cache touches as few blocks as it can

    def slot(self, seq_id: str, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        """Cache slots of positions ``[start, end)``."""
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]


def allocate_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(k, v)``, each ``[num_blocks, num_kv_heads, block_size, head_dim]``, zeroed.

    Blocks are head-major, so one KV head of one block is a contiguous ``[block_size, head_dim]``
    tile: decode attention gathers whole tiles. On the CPU the cache is one anonymous mapping,
    whose 4 KiB pages the kernel zero-fills when a block is first written, so the process's
    memory follows the blocks in use, not the budget. (numpy's ``zeros`` did the same, but it
    asks for transparent huge pages; on our VMs the first touch of each 2 MiB then cost about
    3–4 ms, 0.45 s of the first 4,096-token prefill's cache writes, against about 1 us a 4 KiB page.)
    """
    shape = (2, num_layers, num_blocks, num_kv_heads, block_size, head_dim)
    if torch.device(device).type == "cpu":
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        pages.madvise(mmap.MADV_NOHUGEPAGE)  # also where the system gives every mapping huge pages
        cache = torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps the mapping alive
    else:
        cache = torch.zeros(shape, dtype=dtype, device=device)
    return [(cache[0, i], cache[1, i]) for i in range(num_layers)]


def blocks_for_budget(budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype) -> int:
    """How many blocks fit in ``budget_bytes`` of K and V for all layers."""
    per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    return max(1, budget_bytes // per_block)
