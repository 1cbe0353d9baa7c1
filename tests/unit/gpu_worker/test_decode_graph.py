"""The captured decode step (decode_graph.py) and its Triton attention kernel, on CPU tensors in Triton's
interpreter: the kernel against gathered_decode_attention, and whole engine runs whose decode steps
replay the static-buffer step against engine runs that never do.

As in test_triton_lora.py, the interpreted cases run in a child pytest started with
``TRITON_INTERPRET=1`` (reported by :func:`test_interpreted_cases`); the parent also lowers the
attention kernel to Hopper code. On a CPU the static-buffer step runs eagerly: capture itself
needs CUDA, and ``python -m bench.accelerator`` checks the replay there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.gpu_worker.attention import DecodeGroup, gathered_decode_attention
from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.request import EngineRequest, SamplingParams
from tests.unit.gpu_worker.triton_compile import compile_for_hopper

pytest.importorskip("triton", reason="triton is not installed, so the captured decode step cannot be tested")

ROOT = Path(__file__).resolve().parents[3]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_interpreted_cases with TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_interpreted_cases():
    """Every interpreted case below passes in a child run, none skipped."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
               "-k", "not interpreted_cases and not hopper", __file__]
    child = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-2000:]


@pytest.mark.skipif(INTERPRETED, reason="the interpreter compiles nothing")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_attention_kernel_compiles_for_hopper(dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from services.gpu_worker import triton_attention

    types = {**{name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")},
             "tables_ptr": "*i64", "lengths_ptr": "*i64", "scale": "fp32"}
    assert compile_for_hopper(triton_attention._decode_kernel, types, {"BLOCK_G": 4, "BLOCK_S": 16, "BLOCK_D": 64})


def paged_case(heads: int, kv_heads: int, d: int, bs: int, dtype: torch.dtype, lengths: list[int]):
    """A cache with shuffled blocks; block 0 is NaN and pads every table row past its context,
    so a read beyond a context poisons the output."""
    g = torch.Generator().manual_seed(d * bs + heads)
    widths = [-(-n // bs) for n in lengths]
    num_blocks = 1 + sum(widths)
    cache_k, cache_v = (torch.randn(num_blocks, kv_heads, bs, d, generator=g).to(dtype) for _ in range(2))
    cache_k[0], cache_v[0] = float("nan"), float("nan")
    tables = torch.zeros(len(lengths), max(widths) + 1, dtype=torch.int64)
    blocks = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    for i, w in enumerate(widths):
        tables[i, :w] = torch.tensor(blocks[:w])
        blocks = blocks[w:]
        last = lengths[i] % bs
        if last:  # the unused slots of the last block: NaN too
            cache_k[tables[i, w - 1], :, last:] = float("nan")
            cache_v[tables[i, w - 1], :, last:] = float("nan")
    q = torch.randn(len(lengths), heads, d, generator=g).to(dtype)
    return q, cache_k, cache_v, tables, torch.tensor(lengths)


@interpreted
@pytest.mark.parametrize("heads,kv_heads,d,bs,dtype,atol", [
    (4, 2, 16, 16, torch.float32, 1e-5),  # the tiny model's shape
    (9, 3, 64, 16, torch.bfloat16, 2e-2),  # SmolLM2-135M's (groups of 3, padded to 4)
    (6, 6, 24, 8, torch.float32, 1e-5),  # no GQA, head_dim and block size not what the pads are
])
def test_attention_matches_gathered_reference(heads, kv_heads, d, bs, dtype, atol):
    from services.gpu_worker.triton_attention import paged_decode_attention

    q, cache_k, cache_v, tables, lengths = paged_case(heads, kv_heads, d, bs, dtype, [1, bs, bs + 1, 3 * bs - 2, 40])
    got = paged_decode_attention(q, cache_k, cache_v, tables, lengths)
    clean_k, clean_v = cache_k.nan_to_num(0.0), cache_v.nan_to_num(0.0)  # the reference masks, but 0 * NaN is NaN
    want = gathered_decode_attention(q, clean_k, clean_v, DecodeGroup(torch.arange(len(lengths)), tables, lengths,
                                                                      kv_heads, bs))
    assert got.isfinite().all(), "read past a context"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def model_and_adapters(tmp_path_factory):
    """The tiny fp32 model and its adapters (built here: the child run has no conftest)."""
    from shared.tiny_models import TINY_SEED, build_tiny_model
    from tests.tiny_adapters import build_adapters

    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), seed=TINY_SEED)
    return model_dir, build_adapters(model_dir, tmp_path_factory.mktemp("adapters"))


def generate(engine: LLMEngine, adapters: list[str | None]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy requests with 2..9 new tokens, so the decode batch shrinks through several graph sizes;
    returns each request's ids and every output's logits in order."""
    engine.record_logits = True
    for i, adapter in enumerate(adapters):
        prompt = [(7 * i + j) % 380 + 3 for j in range(3 + 2 * i)]
        engine.add_request(EngineRequest(f"r{i}", prompt, adapter,
                                         SamplingParams(max_tokens=2 + i % 8, temperature=0, ignore_eos=True)))
    ids: dict[str, list[int]] = {f"r{i}": [] for i in range(len(adapters))}
    logits = []
    while engine.has_unfinished():
        for out in engine.step():
            ids[out.request_id] += out.new_token_ids
            logits.append(out.logits)
    return [ids[f"r{i}"] for i in range(len(adapters))], logits


@interpreted
@pytest.mark.parametrize("backend", ["bgmv", "mbgmv"])
def test_static_step_matches_eager_engine(model_and_adapters, backend):
    """Mixed adapters (ranks 8-64, one without weights on some projections) and base requests: the
    engine whose decode steps run the static-buffer step makes the eager engine's tokens and logits."""
    from services.gpu_worker.decode_graph import DecodeGraphs

    model_dir, adapter_dirs = model_and_adapters
    adapters = [*adapter_dirs, None, None]
    config = EngineConfig(backend=backend, dtype="float32", device="cpu", max_batch_size=len(adapters))
    eager = LLMEngine(model_dir, config, dict(adapter_dirs))
    want_ids, want_logits = generate(eager, adapters)

    engine = LLMEngine(model_dir, config, dict(adapter_dirs))
    scratch = engine.blocks.num_blocks
    assert engine.runner.kv[0][0].shape[0] == scratch + 1, "the cache has one block the manager never hands out"
    graphs = DecodeGraphs(engine.model, engine.runner.kv, scratch, config.max_batch_size,
                          engine.blocks.blocks_needed(engine.max_model_len), config.max_lora_rank)
    engine.runner.graphs = graphs
    got_ids, got_logits = generate(engine, adapters)

    assert got_ids == want_ids
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert graphs.replays >= 8, "the decode steps replayed the static step"
    assert {size for size, _ in graphs.captured} >= {1, 2, 4, 8}, "batches shrank through padded sizes"


@interpreted
def test_recording_every_step_at_start_writes_only_the_scratch_block(model_and_adapters):
    """What the engine does on CUDA before serving: every (size, LoRA mode) runs on padding rows alone."""
    from services.gpu_worker.decode_graph import DecodeGraphs

    model_dir, adapter_dirs = model_and_adapters
    engine = LLMEngine(model_dir, EngineConfig(dtype="float32", device="cpu", max_batch_size=4), dict(adapter_dirs))
    engine.model.embed[0] = 0.5  # padding's token (the tiny model's is zeros; no prompt uses it): K/V not 0
    scratch = engine.blocks.num_blocks
    graphs = DecodeGraphs(engine.model, engine.runner.kv, scratch, 4,
                          engine.blocks.blocks_needed(engine.max_model_len), engine.config.max_lora_rank)
    graphs.capture_all()
    assert sorted(graphs.captured, key=str) == sorted(((size, mode) for size in (1, 2, 4)
                                                       for mode in (None, True, False)), key=str)
    for cache_k, cache_v in engine.runner.kv:
        assert not cache_k[:scratch].any() and not cache_v[:scratch].any(), "padding wrote outside the scratch block"
        assert cache_k[scratch].any() and cache_v[scratch].any(), "padding writes its K/V into the scratch block"


def test_capture_sizes_cover_every_batch_up_to_the_largest():
    from services.gpu_worker.decode_graph import capture_sizes

    assert capture_sizes(1) == [1]
    assert capture_sizes(9) == [1, 2, 4, 8, 9]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


def test_pointer_rows_follow_an_adapter_as_its_layers_land():
    """The static tables' rows of a cached adapter are rebuilt once more of its layers are resident,
    and an adapter that is gone leaves no rows behind."""
    import gc

    from services.gpu_worker.graph_lora import PROJ_INDEX, StaticLoraTables
    from services.gpu_worker.lora_plan import LoraSegment
    from shared.peft_adapter import LoraAdapter

    tables = StaticLoraTables(num_layers=2, max_tokens=4, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
    q = (torch.randn(16, 4), torch.randn(4, 16))
    adapter = LoraAdapter("a", "", {(0, "q_proj"): q})
    tables.fill([LoraSegment(1, 3, adapter)])
    assert tables.segs.tolist() == [[1, 3, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert tables.adapters[0, PROJ_INDEX["q_proj"], 0].tolist() == [q[0].data_ptr(), q[1].data_ptr(), 4]
    assert tables.adapters[1, PROJ_INDEX["down_proj"], 0].tolist() == [0, 0, 0]

    down = (torch.randn(32, 8), torch.randn(8, 16))
    adapter.weights[(1, "down_proj")] = down  # a later layer group lands
    tables.fill([LoraSegment(0, 2, adapter)])
    assert tables.adapters[1, PROJ_INDEX["down_proj"], 0].tolist() == [down[0].data_ptr(), down[1].data_ptr(), 8]

    del adapter
    gc.collect()
    assert tables.cached_adapters == 0

    wrong = LoraAdapter("b", "", {(0, "q_proj"): (q[0].to(torch.bfloat16), q[1].to(torch.bfloat16))})
    with pytest.raises(ValueError, match="contiguous torch.float32 weights"):
        tables.fill([LoraSegment(0, 1, wrong)])
