"""`caraserve batch`: the offline contract (lines in, lines out, errors per line, exit codes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def caraserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          timeout=300)


def write_lines(path, lines) -> None:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))


@pytest.fixture(scope="module")
def batch_run(tiny_model_dir, tiny_adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    names = list(tiny_adapters)
    lines = [
        {"id": "a", "prompt_token_ids": [5, 6, 7, 8], "adapter": names[0], "max_tokens": 5, "temperature": 0,
         "ignore_eos": True},
        {"id": "b", "prompt": "hello world", "adapter": None, "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        "{not json",
        {"id": "c", "prompt_token_ids": [5, 6], "adapter": "no-such-adapter", "max_tokens": 3},
        {"id": "d", "prompt_token_ids": [5, 6], "max_tokens": -1},
        {"id": "e", "prompt_token_ids": [9, 10, 11], "adapter": names[1], "max_tokens": 6, "temperature": 0.8,
         "top_p": 0.9, "top_k": 20, "seed": 7, "ignore_eos": True},
        {"id": "f", "prompt": "x", "prompt_token_ids": [1]},
    ]
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    write_lines(inp, lines)
    args = ["batch", "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu",
            "--backend", "mbgmv", "--max-batch-size", "4"]
    args += [f"--adapter={n}={p}" for n, p in tiny_adapters.items()]
    proc = caraserve(*args, str(inp), str(out))
    return proc, [json.loads(ln) for ln in out.read_text().splitlines()]


def test_good_lines_complete_and_bad_lines_get_error_lines(batch_run):
    proc, records = batch_run
    assert proc.returncode == 0, proc.stderr
    by_id = {r["id"]: r for r in records}
    assert [r["id"] for r in records] == ["a", "b", "line-3", "c", "d", "e", "f"]
    assert len(by_id["a"]["token_ids"]) == 5 and by_id["a"]["finish_reason"] == "length"
    assert len(by_id["b"]["token_ids"]) == 4 and "error" not in by_id["b"]
    assert len(by_id["e"]["token_ids"]) == 6
    for rid in ("line-3", "c", "d", "f"):
        assert by_id[rid]["finish_reason"] == "error" and by_id[rid]["error"], rid
    assert "unknown adapter" in by_id["c"]["error"]


def test_bad_flag_is_one_line(tmp_path):
    proc = caraserve("batch", "--backend", "nope", str(tmp_path / "i"), str(tmp_path / "o"))
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("case", ["missing_model", "bad_adapter", "adapter_syntax"])
def test_unloadable_model_or_adapter_is_one_line(case, tiny_model_dir, bad_adapters, tmp_path):
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": "a", "prompt_token_ids": [1, 2], "max_tokens": 1}])
    model = str(tmp_path / "nowhere") if case == "missing_model" else str(tiny_model_dir)
    extra = {"missing_model": [], "bad_adapter": [f"--adapter=x={bad_adapters['dora']}"],
             "adapter_syntax": ["--adapter=just-a-name"]}[case]
    proc = caraserve("batch", "--model", model, "--dtype", "float32", *extra, str(inp), str(tmp_path / "o"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.timeout(300)
def test_cpu_assist_batch_starts_its_pool_and_says_how_prefills_got_their_deltas(batch_run, tiny_model_dir,
                                                                                 tiny_adapters, tmp_path):
    _, cached = batch_run
    names = list(tiny_adapters)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": "a", "prompt_token_ids": [5, 6, 7, 8], "adapter": names[0], "max_tokens": 5,
                       "temperature": 0, "ignore_eos": True},
                      {"id": "b", "prompt": "hello world", "adapter": None, "max_tokens": 4, "temperature": 0,
                       "ignore_eos": True}])
    proc = caraserve("batch", "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu",
                     "--backend", "mbgmv", "--cold-start", "cpu_assist", "--cpu-prefill-workers", "1",
                     "--emulate-link-gbps", "0.00002", "--emulate-link-latency-ms", "300",
                     *[f"--adapter={n}={p}" for n, p in tiny_adapters.items()], str(inp), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "EMULATED host-to-device link" in proc.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["a"]["token_ids"] == cached[0]["token_ids"]  # same greedy tokens as the cached run
    assert records["a"]["prefill_lora"]["cpu_layers"] > 0 and records["a"]["prefill_lora"]["device_layers"] == 0
    assert records["b"]["prefill_lora"] == {"cpu_layers": 0, "device_layers": 0, "waited_ms": 0.0}
    assert set(cached[0]["prefill_lora"]) == {"cpu_layers", "device_layers", "waited_ms"}
