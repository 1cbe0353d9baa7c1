"""The native CPU attention kernels against their plain-torch references: decode (gather + SDPA) and
prefill (causal SDPA per sequence)."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.attention import (DecodeGroup, PrefillGroup, gathered_decode_attention, pair_k_tiles,
                                           sdpa_prefill_attention)
from shared.native_ops import paged_attention_kernel

BLOCK = 16


@pytest.fixture(scope="module")
def kernel():
    module = paged_attention_kernel()
    if module is None:
        pytest.skip("no C++ compiler here: the engine uses the torch path")
    return module


def _case(lengths: list[int], heads: int, kv_heads: int, dtype: torch.dtype, seed: int = 0, d: int = 64):
    """A shuffled paged cache holding ``lengths`` contexts, their queries and the reference's metadata."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // BLOCK) for n in lengths)
    num_blocks = sum(-(-n // BLOCK) for n in lengths) + 3
    cache_k = torch.randn(num_blocks, kv_heads, BLOCK, d, generator=gen).to(dtype)
    cache_v = torch.randn(num_blocks, kv_heads, BLOCK, d, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        need = -(-n // BLOCK)
        tables[i, :need] = torch.tensor([order.pop() for _ in range(need)])
    q = torch.randn(len(lengths), heads, d, generator=gen).to(dtype)
    group = DecodeGroup(torch.arange(len(lengths)), tables, torch.tensor(lengths), kv_heads, BLOCK)
    return q, cache_k, cache_v, group


def _native(kernel, q, cache_k, cache_v, group):
    """The kernel's output for a row-major ``cache_k``, stored first in the tile layout the kernel reads."""
    if kernel.paired_k_tiles(cache_k):
        cache_k = pair_k_tiles(cache_k)
    return kernel.paged_decode_attention(q, cache_k, cache_v, group.tables, group.lengths)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1.6e-2)])
def test_matches_the_gathered_reference(kernel, heads, kv_heads, dtype, tol):
    # lengths: one token, exactly one block, one past a block, long, and a block boundary
    q, ck, cv, group = _case([1, 16, 17, 200, 64, 33, 5], heads, kv_heads, dtype, seed=heads)
    ref = gathered_decode_attention(q, ck, cv, group).float()
    out = _native(kernel, q, ck, cv, group).float()
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 128), (16, 1, 32), (18, 2, 64)])
def test_other_head_shapes(kernel, heads, kv_heads, d):
    # head_dim 128 takes the bf16 fast path too; 32, or more than 8 query heads per KV head, the float32
    # one (with 9 heads per KV head over paired K tiles, where this CPU pairs them)
    q, ck, cv, group = _case([1, 31, 90], heads, kv_heads, torch.bfloat16, seed=d, d=d)
    ref = gathered_decode_attention(q, ck, cv, group).float()
    out = _native(kernel, q, ck, cv, group).float()
    assert (out - ref).abs().max().item() <= 1.6e-2 * max(1.0, ref.abs().max().item())


def test_large_scores_stay_finite(kernel):
    # big logits (softmax of values ~ 1e3 apart) must not overflow the exponentials
    q, ck, cv, group = _case([40, 3], 9, 3, torch.float32, seed=7)
    q = q * 300
    out = kernel.paged_decode_attention(q, ck, cv, group.tables, group.lengths)
    ref = gathered_decode_attention(q, ck, cv, group)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slots_past_the_context_are_never_read(kernel, dtype):
    # the last tile of each context ends before the tile does: its later slots may hold anything
    q, ck, cv, group = _case([7, 21, 16], 9, 3, dtype, seed=5)
    before = _native(kernel, q, ck, cv, group)
    for row, n in enumerate(group.lengths.tolist()):
        last = group.tables[row, (n - 1) // BLOCK]
        ck[last, :, n % BLOCK or BLOCK:] = float("inf")
        cv[last, :, n % BLOCK or BLOCK:] = float("nan")
    assert torch.equal(_native(kernel, q, ck, cv, group), before)


def test_padding_blocks_are_never_read(kernel):
    q, ck, cv, group = _case([20, 3], 9, 3, torch.float32, seed=3)
    before = kernel.paged_decode_attention(q, ck, cv, group.tables, group.lengths)
    unused = sorted(set(range(ck.shape[0])) - set(group.tables[0, :2].tolist()) - {group.tables[1, 0].item()})
    ck[unused], cv[unused] = float("nan"), float("nan")
    assert torch.equal(kernel.paged_decode_attention(q, ck, cv, group.tables, group.lengths), before)


@pytest.mark.parametrize("mutate,message", [
    (lambda t, n: t.__setitem__((0, 0), 10_000), "block index"),
    (lambda t, n: n.__setitem__(0, 10_000), "context length"),
    (lambda t, n: n.__setitem__(0, 0), "context length"),
])
def test_bad_metadata_is_refused(kernel, mutate, message):
    q, ck, cv, group = _case([20, 3], 9, 3, torch.float32)
    tables, lengths = group.tables.clone(), group.lengths.clone()
    mutate(tables, lengths)
    with pytest.raises(RuntimeError, match=message):
        kernel.paged_decode_attention(q, ck, cv, tables, lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_index_copy(kernel, dtype):
    # v as the engine hands it over: a column slice of the fused q|k|v output (strided rows)
    gen = torch.Generator().manual_seed(11)
    tokens, kv_heads, d = 5, 3, 64
    qkv = torch.randn(tokens, (9 + 2 * kv_heads) * d, generator=gen).to(dtype)
    k = torch.randn(tokens, kv_heads, d, generator=gen).to(dtype)
    v = qkv[:, -kv_heads * d:].view(tokens, kv_heads, d)
    cache_k, cache_v = torch.zeros(4, kv_heads, BLOCK, d, dtype=dtype), torch.zeros(4, kv_heads, BLOCK, d, dtype=dtype)
    rows = torch.randperm(cache_k.numel() // d, generator=gen)[:tokens * kv_heads]
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    ref_k.view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
    ref_v.view(-1, d).index_copy_(0, rows, v.reshape(-1, d))
    kernel.write_kv_(cache_k, cache_v, k, v, rows)
    if kernel.paired_k_tiles(cache_k):
        ref_k = pair_k_tiles(ref_k)
    assert torch.equal(cache_k, ref_k) and torch.equal(cache_v, ref_v)


def test_k_tiles_are_paired_exactly_where_the_bf16_fast_path_reads_them(kernel):
    cache = torch.zeros(2, 3, BLOCK, 64, dtype=torch.bfloat16)
    paired = kernel.paired_k_tiles(cache)
    assert not kernel.paired_k_tiles(cache.float())
    assert not kernel.paired_k_tiles(torch.zeros(2, 3, BLOCK, 32, dtype=torch.bfloat16))
    assert not kernel.paired_k_tiles(torch.zeros(2, 3, 8, 64, dtype=torch.bfloat16))
    if paired:  # the layout itself: pair j of token t sits at word j * 16 + t of its tile
        tile = torch.arange(BLOCK * 64, dtype=torch.float32).view(1, 1, BLOCK, 64).to(torch.bfloat16)
        words = pair_k_tiles(tile).view(-1, 2)
        assert torch.equal(words[5 * BLOCK + 3], tile[0, 0, 3, 10:12])


def test_write_kv_refuses_rows_outside_the_cache(kernel):
    k = torch.randn(1, 2, 16)
    cache = torch.zeros(1, 2, BLOCK, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.write_kv_(cache, cache.clone(), k, k.clone(), torch.tensor([0, 2 * BLOCK]))


def _prefill_case(lengths: list[int], heads: int, kv_heads: int, d: int = 64, seed: int = 0):
    """A step's prefill tokens for sequences of ``lengths``, their K/V written through ``write_kv_``
    into a shuffled bf16 cache whose unused slots hold inf (K) and NaN (V)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    num_blocks = sum(-(-n // BLOCK) for n in lengths) + 3
    cache_k = torch.full((num_blocks, kv_heads, BLOCK, d), float("inf"), dtype=torch.bfloat16)
    cache_v = torch.full((num_blocks, kv_heads, BLOCK, d), float("nan"), dtype=torch.bfloat16)
    q, k, v = (torch.randn(tokens, h, d, generator=gen).to(torch.bfloat16) for h in (heads, kv_heads, kv_heads))
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(lengths), max(-(-n // BLOCK) for n in lengths), dtype=torch.int64)
    rows, ranges, start = [], [], 0
    for i, n in enumerate(lengths):
        blocks = [order.pop() for _ in range(-(-n // BLOCK))]
        tables[i, :len(blocks)] = torch.tensor(blocks)
        rows += [(blocks[p // BLOCK] * kv_heads + h) * BLOCK + p % BLOCK for p in range(n) for h in range(kv_heads)]
        ranges.append((start, start + n))
        start += n
    group = PrefillGroup(ranges, torch.tensor([a for a, _ in ranges]), torch.tensor(lengths), tables)
    return q, k, v, cache_k, cache_v, torch.tensor(rows), group


def _sdpa_prefill(q, k, v, group):
    out = torch.empty_like(q)
    sdpa_prefill_attention(out, q, k, v, group.ranges)
    return out


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 64), (8, 1, 128)])
def test_prefill_matches_causal_sdpa(kernel, heads, kv_heads, d):
    # lengths: one token, around a tile, past the 64-token query block, and long
    q, k, v, ck, cv, rows, group = _prefill_case([1, 15, 16, 17, 65, 130, 40], heads, kv_heads, d, seed=heads)
    if not kernel.prefills(ck, heads):
        pytest.skip("this CPU has no native prefill path (bf16 paired tiles)")
    kernel.write_kv_(ck, cv, k, v, rows)
    out = torch.zeros_like(q)
    kernel.paged_prefill_attention_(out, q, ck, cv, group.tables, group.starts, group.lengths)
    ref = _sdpa_prefill(q, k, v, group).float()
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() <= 1.6e-2 * max(1.0, ref.abs().max().item())


def test_prefill_writes_only_the_prefill_rows(kernel):
    q, k, v, ck, cv, rows, group = _prefill_case([20, 3], 9, 3)
    if not kernel.prefills(ck, 9):
        pytest.skip("this CPU has no native prefill path")
    kernel.write_kv_(ck, cv, k, v, rows)
    out = torch.full((q.shape[0] + 2, 9, 64), 7.0, dtype=torch.bfloat16)  # two rows of decode tokens after them
    kernel.paged_prefill_attention_(out, torch.cat([q, q[:2]]), ck, cv, group.tables, group.starts, group.lengths)
    assert torch.equal(out[-2:], torch.full((2, 9, 64), 7.0, dtype=torch.bfloat16))


def test_prefill_path_only_where_tiles_are_paired(kernel):
    assert not kernel.prefills(torch.zeros(2, 3, BLOCK, 64), 9)
    assert kernel.prefills(torch.zeros(2, 3, BLOCK, 64, dtype=torch.bfloat16), 9) <= \
        kernel.paired_k_tiles(torch.zeros(2, 3, BLOCK, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("mutate,message", [
    (lambda g: g.tables.__setitem__((0, 0), 10_000), "block index"),
    (lambda g: g.lengths.__setitem__(0, 10_000), "sequence length"),
    (lambda g: g.starts.__setitem__(1, 10_000), "outside q"),
])
def test_bad_prefill_metadata_is_refused(kernel, mutate, message):
    q, k, v, ck, cv, rows, group = _prefill_case([20, 3], 9, 3)
    if not kernel.prefills(ck, 9):
        pytest.skip("this CPU has no native prefill path")
    mutate(group)
    with pytest.raises(RuntimeError, match=message):
        kernel.paged_prefill_attention_(torch.empty_like(q), q, ck, cv, group.tables, group.starts, group.lengths)


@pytest.mark.parametrize("m,n,k", [(1, 16, 2), (2, 32, 24), (3, 64, 10), (5, 48, 64), (6, 64, 32), (11, 144, 66),
                                   (64, 256, 64), (7, 80, 130), (4, 128, 128)])
def test_dot_gemm_matches_matmul(kernel, m, n, k):
    # the prefill's GEMMs on CPUs without AMX: B in pairs along K, a strided as q's rows are, row and
    # column counts off the 6-row and 64-column blocks (every tail block of 1-5 rows)
    if not kernel.paired_k_tiles(torch.zeros(1, 1, BLOCK, 64, dtype=torch.bfloat16)):
        pytest.skip("this CPU has no bf16 dot-product instruction")
    gen = torch.Generator().manual_seed(m * n + k)
    a = torch.randn(m, k + 6, generator=gen).to(torch.bfloat16)[:, 3:k + 3]
    b = torch.randn(k, n, generator=gen).to(torch.bfloat16)
    got = kernel.dot_gemm(a, b.view(k // 2, 2, n).transpose(1, 2).contiguous())
    ref = a.double() @ b.double()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert (got.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item()) * k ** 0.5
