"""allocate_cache on the CPU: one zeroed anonymous mapping whose pages become resident only when
written, in 4 KiB pages (no transparent huge pages, whose first touch cost milliseconds each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.gpu_worker.kv_cache import allocate_cache

SMAPS = Path("/proc/self/smaps")


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    fields: dict[str, str] = {}
    inside = False
    for line in SMAPS.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
            continue
        if inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _kib(value: str) -> int:
    return int(value.split()[0])


@pytest.mark.skipif(not SMAPS.exists(), reason="needs /proc/self/smaps (Linux)")
def test_cache_pages_are_resident_only_once_written_and_never_huge():
    layers, blocks = 4, 2048  # 4 layers x 2048 blocks x 3 heads x 16 x 64 bf16, K and V: 96 MiB
    kv = allocate_cache(layers, blocks, 16, 3, 64, torch.bfloat16, "cpu")
    k0, v3 = kv[0][0], kv[3][1]
    assert k0.shape == (blocks, 3, 16, 64) and k0.dtype == torch.bfloat16
    before = _mapping_of(k0.data_ptr())
    assert _kib(before["Size"]) >= 96 * 1024
    assert _kib(before["Rss"]) < 1024  # allocated, not yet written (the mapping may hold a few other pages)
    assert before.get("THPeligible", "0") == "0"  # no huge pages asked for
    k0[::8, 0, 0].fill_(1.0)  # one row in every 8th block (48 KiB apart): 256 pages of 4 KiB
    v3[-1].fill_(2.0)
    after = _mapping_of(k0.data_ptr())
    grown = _kib(after["Rss"]) - _kib(before["Rss"])
    # 1 MiB and two pages for v3's last block, plus what reading smaps allocated; huge pages would make it 96 MiB
    assert 1024 <= grown < 1024 + 512
    assert _kib(after.get("AnonHugePages", "0 kB")) == 0
    assert k0.sum() == (blocks // 8) * 64 and v3[:-1].abs().sum() == 0
