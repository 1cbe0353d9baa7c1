"""The native CPU kernel's pair layouts (lora_ops.kernel_layout): pack_a and pack_b against
plain-torch definitions, lora_segments_ reading packed weights exactly as plain ones, and the
residency keeping adapters packed where that kernel runs."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.lora_ops import LoraBatch, bgmv, kernel_layout, mbgmv
from services.gpu_worker.request import EngineRequest, SamplingParams
from shared.native_ops import cpu_lora_kernel


def _packing_kernel():
    kernel = cpu_lora_kernel()
    if kernel is None or not kernel.packs(8, 96, 208):
        pytest.skip("no C++ compiler or no bf16 pair paths here: adapters stay plain")
    return kernel


def pairs_reference(a: torch.Tensor) -> torch.Tensor:
    """A [in, r] -> [in / 2, r, 2]: element (i, c, j) is A[2i + j, c]."""
    return a.reshape(a.shape[0] // 2, 2, a.shape[1]).transpose(1, 2).contiguous()


def blocked_pairs_reference(b: torch.Tensor) -> torch.Tensor:
    """B [r, out] -> [ceil(out / 64), ceil(r / 2), 64, 2]: element (o, k, c, j) is B[2k + j, 64 o + c],
    zero past row r and column out."""
    r, out = b.shape
    rows, cols = (r + 1) // 2 * 2, (out + 63) // 64 * 64
    padded = torch.zeros(rows, cols, dtype=b.dtype)
    padded[:r, :out] = b
    return padded.reshape(rows // 2, 2, cols // 64, 64).permute(2, 0, 3, 1).contiguous()


@pytest.mark.parametrize("rank,fan_in,out", [(1, 96, 208), (7, 96, 64), (8, 576, 192), (64, 1536, 576), (33, 2, 16)])
def test_pack_a_and_pack_b_match_their_definitions(rank, fan_in, out):
    kernel = _packing_kernel()
    g = torch.Generator().manual_seed(rank)
    a, b = torch.randn(fan_in, rank, generator=g).bfloat16(), torch.randn(rank, out, generator=g).bfloat16()
    assert torch.equal(kernel.pack_a(a), pairs_reference(a))
    assert torch.equal(kernel.pack_b(b), blocked_pairs_reference(b))


def _batch(ranks, lengths, fan_in, out, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(fan_in, r, generator=g).bfloat16() for r in ranks]
    B = [torch.randn(r, out, generator=g).bfloat16() * 0.1 for r in ranks]
    rows, pos = [], 0
    for u, n in enumerate(lengths):
        rows.append((pos, pos + n, u))
        pos += n
    x = torch.randn(pos + 2, fan_in, generator=g).bfloat16()
    return torch.tensor(rows, dtype=torch.int64), A, B, x


# decode-sized and prefill-sized segments; rank 128 is never packed, so in BGMV every adapter pads to
# it and the packed ones are unpacked for the float loop and for BLAS
CASES = [([8, 7, 64, 1, 16, 33], [1, 3, 4, 5, 2, 7]),
         ([8, 7, 64, 1, 16, 33], [40, 1, 17, 3, 20, 33]),
         ([8, 128, 64], [3, 2, 40])]


@pytest.mark.parametrize("ranks,lengths", CASES)
@pytest.mark.parametrize("out", [208, 576])
def test_packed_weights_give_the_plain_weights_result_exactly(ranks, lengths, out):
    _packing_kernel()
    segs, A, B, x = _batch(ranks, lengths, 96, out)
    laid = [kernel_layout(a, b) for a, b in zip(A, B)]
    assert [a.dim() for a, _ in laid] == [2 if r > 64 else 3 for r in ranks]
    packed = LoraBatch.of(segs, [a for a, _ in laid], [b for _, b in laid])
    base = torch.randn(x.shape[0], out).bfloat16()
    for op in (bgmv, mbgmv):
        plain_y, packed_y = base.clone(), base.clone()
        op(plain_y, x, LoraBatch.of(segs, A, B))
        op(packed_y, x, packed)
        assert torch.equal(packed_y, plain_y), op.__name__
        assert not torch.equal(packed_y, base)


def test_kernel_layout_leaves_what_it_does_not_pack():
    kernel = _packing_kernel()
    a, b = torch.randn(96, 8).bfloat16(), torch.randn(8, 208).bfloat16()
    laid = kernel_layout(a, b)
    assert kernel_layout(*laid) == laid  # already in pairs: the same tensors
    for pair in ((a.float(), b.float()), (torch.randn(97, 8).bfloat16(), b), (torch.randn(96, 80).bfloat16(),
                                                                               torch.randn(80, 208).bfloat16())):
        assert kernel_layout(*pair) == pair
    assert kernel.packs(8, 96, 208) and not kernel.packs(0, 96, 208)


def test_torch_paths_refuse_packed_weights():
    _packing_kernel()
    segs, A, B, x = _batch([8], [3], 96, 208)
    a, b = kernel_layout(A[0], B[0])
    with pytest.raises(ValueError, match="native CPU kernel only"):
        mbgmv(torch.zeros(x.shape[0], 208).bfloat16(), x, LoraBatch.of(segs, [a], [b]), use_native=False)


def test_kernel_refuses_a_packed_shape_that_does_not_fit():
    kernel = _packing_kernel()
    segs, A, B, x = _batch([8], [3], 96, 208)
    a, b = kernel_layout(A[0], B[0])
    y = torch.zeros(x.shape[0], 208).bfloat16()
    with pytest.raises(RuntimeError, match="shape"):
        kernel.lora_segments_(y, x, segs, [a], [kernel.pack_b(torch.randn(8, 192).bfloat16())], 0)
    with pytest.raises(RuntimeError, match="shape"):
        kernel.lora_segments_(y, x[:, :94].contiguous(), segs, [a], [b], 0)


@pytest.mark.parametrize("native_ops", [True, False])
def test_cpu_residency_keeps_adapters_in_pairs_once(tiny_model_dir, tiny_adapters, native_ops):
    """With the native kernel, the host copy is laid out once and the device tier shares it (no second
    copy); without it, both stay plain. Either way the engine serves the adapter."""
    _packing_kernel()
    engine = LLMEngine(tiny_model_dir, EngineConfig(dtype="bfloat16", device="cpu", native_ops=native_ops),
                       dict(tiny_adapters))
    try:
        name = sorted(tiny_adapters)[0]
        device = engine.residency.cache.get(name).adapter.weights
        host = engine.residency.host_store.get(engine.residency.registry.lookup(name)).weights
        assert device and all(device[k][0] is host[k][0] and device[k][1] is host[k][1] for k in device)
        assert {(a.dim(), b.dim()) for a, b in device.values()} == ({(3, 4)} if native_ops else {(2, 2)})
        engine.add_request(EngineRequest("r", [5, 6, 7], name, SamplingParams(max_tokens=3, temperature=0,
                                                                                  ignore_eos=True)))
        tokens = []
        while engine.has_unfinished():
            tokens += [t for o in engine.step() for t in o.new_token_ids]
        assert len(tokens) == 3
    finally:
        engine.residency.close()


def _at_page_end(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose last byte ends a page that a PROT_NONE page follows: any read past it faults."""
    import ctypes
    import mmap

    page, nbytes = mmap.PAGESIZE, t.numel() * t.element_size()
    pages = (nbytes + page - 1) // page
    buf = mmap.mmap(-1, (pages + 1) * page)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + pages * page), page, 0) == 0
    view = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=pages * page - nbytes).view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("rank", [1, 7, 8, 16, 64])
def test_laid_out_weights_are_never_read_past_their_end(rank):
    """Weights at the very end of readable memory: the decode and prefill paths, MBGMV and BGMV (pad 64),
    read nothing past them (a read there would stop the process)."""
    kernel = _packing_kernel()
    segs, A, B, x = _batch([rank], [5], 96, 208)
    a, b = (_at_page_end(w) for w in kernel_layout(A[0], B[0]))
    for lengths in ([5], [40]):
        segs = torch.tensor([[0, lengths[0], 0]])
        xs = torch.randn(lengths[0], 96).bfloat16()
        for pad in (0, 64):
            y, want = torch.zeros(lengths[0], 208).bfloat16(), torch.zeros(lengths[0], 208).bfloat16()
            kernel.lora_segments_(y, xs, segs, [a], [b], pad)
            kernel.lora_segments_(want, xs, segs, [A[0]], [B[0]], pad)
            assert torch.equal(y, want)
