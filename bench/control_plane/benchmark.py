"""Benchmark: the latency the NATS control plane adds, and sustained throughput through the gateway.

The whole stack runs as ``caraserve up`` runs it (LocalStack: nats-server, a scheduler, two
gpu_workers, the gateway, each its own process, loopback only) on a tiny seeded random Llama
with two LoRA adapters, so the engine's own work is a sliver of a millisecond.

1. **Added latency.** 1-token requests, one at a time, over NATS (``caraserve.v1.generate``,
   streamed) and over HTTP (``/v1/completions``, SSE). For each request: TTFT at the client,
   minus TTFT inside the engine for the same request (the worker's ``worker.queue`` span starts
   when it receives the submit; its ``worker.prefill`` span ends at the first token). The spans
   reach a loopback OTLP receiver (bench/control_plane/otlp_sink.py); span export is deferred to shutdown
   so it does not run during the measurement. Targets: p50 <= 2 ms, p99 <= 10 ms.
   The same run first measures the bare-transport floor (bench/control_plane/nats_floor.py: the same five
   NATS messages through minimal relays) and reports the added latency over it.
2. **Throughput.** An open-loop NATS load at each ``--rates`` value (default 200 requests/s)
   for ``--duration-s``; every request must complete without error.

    python -m bench.control_plane [--latency-requests 400] [--rates 200] [--duration-s 10]

Prints JSON; writes bench/results/control_plane-cpu.json and a PNG next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import nats
import uvloop

from bench.control_plane.clients import (LoadRun, ReplyRouter, http_sequential, nats_sequential,
                                         open_loop)
from bench.control_plane.report import (index_spans, latency_samples, latency_summary, percentiles_ms, plot,
                                        throughput_summary)
from bench.control_plane.nats_floor import RELAYS, measure_floor
from bench.control_plane.otlp_sink import OtlpSink
from bench.control_plane.process_cpu import cpu_seconds, per_request_ms, stack_processes
from bench.paths import RESULTS
from launcher.local_stack import LocalStack, StackConfig
from shared.llama_shape import LlamaShape
from shared.perf_model import current_device_name
from shared.schemas import GenerateRequest
from shared.synthetic_adapters import write_adapter

TARGET_P50_MS, TARGET_P99_MS, TARGET_RPS = 2.0, 10.0, 200.0
ADAPTERS = {"bench-r8": 8, "bench-r16": 16}
PROMPTS = ("The small model reads a sentence and guesses the next word.",
           "Rivers run down to the sea, and the sea rises into clouds.",
           "A good recipe for bread needs flour, water, salt and yeast.",
           "Questions and answers: what is the capital of France?")
OTEL_VARS = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SERVICE_NAME",
             "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
             "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL")


def build_models(root: Path) -> tuple[Path, Path]:
    """The tiny random Llama of the tests (seeded) and two random LoRA adapters on it."""
    from shared.tiny_models import TINY_SEED, build_tiny_model

    model_dir = build_tiny_model(root / "tiny-llama", seed=TINY_SEED)
    shape = LlamaShape.from_model_dir(model_dir)
    for seed, (name, rank) in enumerate(ADAPTERS.items()):
        write_adapter(root / "adapters" / name, shape, rank, ("q_proj", "v_proj"), seed, str(model_dir))
    return model_dir, root / "adapters"


def stack_config(model_dir: Path, adapter_dir: Path, run_dir: Path, sink: OtlpSink, workers: int) -> StackConfig:
    env = {"CARASERVE_DTYPE": "float32", "CARASERVE_NUM_KV_BLOCKS": "1024",
           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.endpoint,
           # keep every span in memory until shutdown: no export while we measure
           "OTEL_BSP_SCHEDULE_DELAY": "3600000", "OTEL_BSP_MAX_QUEUE_SIZE": "1000000",
           "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1000000", "OTEL_BSP_EXPORT_TIMEOUT": "60000"}
    return StackConfig(model=str(model_dir), adapter_dir=str(adapter_dir), http_port=0, nats_port=0, workers=workers,
                       schedulers=1, ready_timeout_s=300, run_dir=str(run_dir), extra_env=env)


def generate_request(i: int, tag: str, models: list[str]) -> GenerateRequest:
    return GenerateRequest(model=models[i % len(models)], prompt=PROMPTS[i % len(PROMPTS)], max_tokens=1,
                           temperature=0, ignore_eos=True, stream=True, request_id=f"{tag}-{i}")


def http_body(i: int, models: list[str]) -> dict:
    return {"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 1,
            "temperature": 0, "ignore_eos": True, "stream": True}


async def measure(stack: LocalStack, models: list[str], args: argparse.Namespace) -> dict:
    """Run every phase against the running stack: the client records, and CPU ms per request per process."""
    processes = stack_processes(stack.procs)
    nc = await nats.connect(stack.nats_url, name="bench-control-plane",
                            **stack.creds.credentials("operator").connect_options())
    try:
        router = await ReplyRouter(nc).start()
        n = args.latency_requests
        await nats_sequential(nc, router, [generate_request(i, "warm", models) for i in range(args.warmup)], 30)
        await http_sequential(stack.http_url, [http_body(i, models) for i in range(args.warmup)], 30)
        phases: dict = {"load": [], "cpu_ms_per_request": {}}

        async def phase(name: str, count: int, work: Awaitable) -> Any:
            before = cpu_seconds(processes)
            result = await work
            phases["cpu_ms_per_request"][name] = per_request_ms(before, cpu_seconds(processes), count)
            return result

        phases["nats"] = await phase("nats", n, nats_sequential(
            nc, router, [generate_request(i, "lat", models) for i in range(n)], 30))
        phases["http"] = await phase("http", n, http_sequential(
            stack.http_url, [http_body(i, models) for i in range(n)], 30))
        for rate in args.rates:
            await asyncio.sleep(1.0)  # let the previous phase settle
            make = functools.partial(generate_request, tag=f"load{rate:g}", models=models)
            phases["load"].append(await phase(f"load{rate:g}", int(rate * args.duration_s), open_loop(
                nc, router, make, rate, args.duration_s, drain_s=10.0)))
        return phases
    finally:
        await nc.close()


def run_stack(args: argparse.Namespace, workdir: Path) -> tuple[dict, list]:
    """Start the stack, measure, stop it (which flushes the spans into the sink)."""
    model_dir, adapter_dir = build_models(workdir)
    for name in OTEL_VARS:
        os.environ.pop(name, None)
    with OtlpSink() as sink:
        stack = LocalStack(stack_config(model_dir, adapter_dir, workdir / "run", sink, args.workers))
        print(f"starting the stack (logs in {stack.run_dir}) ...", file=sys.stderr)
        stack.start()
        try:
            models = [model_dir.name, *ADAPTERS]
            phases = uvloop.run(measure(stack, models, args))  # the loop the services run on
        finally:
            stack.stop()
        deadline = time.monotonic() + 30
        while not _spans_cover(sink, phases) and time.monotonic() < deadline:
            time.sleep(0.2)
        return phases, sink.spans()


def _spans_cover(sink: OtlpSink, phases: dict) -> bool:
    ids = {t.request_id for t in phases["nats"] + phases["http"]}
    seen = {s.attributes.get("request.id") for s in sink.spans() if s.name == "worker.prefill"}
    return ids <= seen


def report(args: argparse.Namespace, phases: dict, spans: list, load_before: float,
           floor_ms: list[float]) -> tuple[dict, dict]:
    indexed = index_spans(spans)
    samples = {name: latency_samples(phases[name], indexed) for name in ("nats", "http")}
    latency = {name: latency_summary(samples[name], sum(not t.ok for t in phases[name])) for name in samples}
    load: list[LoadRun] = phases["load"]
    throughput = [throughput_summary(run) for run in load]
    nats_added = latency["nats"]["added_ms"]
    floor = percentiles_ms([x * 1e6 for x in floor_ms])
    at_target = next((t for t in throughput if t["offered_rps"] >= TARGET_RPS), None)
    result = {
        "bench": "control_plane", "device": "cpu", "device_name": current_device_name("cpu"),
        "python": platform.python_version(), "cores": os.cpu_count(),
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "stack": {"workers": args.workers, "schedulers": 1, "model": "tiny random Llama (3 layers, hidden 64)",
                  "adapters": ADAPTERS, "max_tokens": 1, "span_export": "deferred to shutdown"},
        "latency": latency,
        "transport_floor": {"messages": RELAYS + 1, "round_trip_ms": floor,
                            "what": "the same five NATS messages through bare nats-py relays "
                                    "(bench/control_plane/nats_floor.py)"},
        "nats_added_over_floor_p50": round(nats_added["p50"] / floor["p50"], 2) if nats_added and floor else None,
        "throughput": throughput, "cpu_ms_per_request": phases["cpu_ms_per_request"],
        "targets": {"added_p50_ms": TARGET_P50_MS, "added_p99_ms": TARGET_P99_MS, "rps": TARGET_RPS},
        "meets_latency_target": bool(nats_added and nats_added["p50"] <= TARGET_P50_MS
                                     and nats_added["p99"] <= TARGET_P99_MS),
        "meets_throughput_target": bool(at_target and not at_target["errors"]
                                        and at_target["achieved_rps"] >= 0.97 * at_target["offered_rps"]),
    }
    return result, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-requests", type=int, default=400, help="1-token requests per client (sequential)")
    parser.add_argument("--warmup", type=int, default=30, help="requests sent first and not counted")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[TARGET_RPS],
                        help="open-loop rates (requests/s), comma-separated")
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds of load per rate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "control_plane-cpu.json"))
    args = parser.parse_args(argv)
    if args.latency_requests < 1 or args.duration_s <= 0 or any(r <= 0 for r in args.rates):
        parser.error("--latency-requests, --duration-s and --rates must be positive")
    load_before = os.getloadavg()[0]
    print("measuring the bare-transport floor ...", file=sys.stderr)
    floor_ms = measure_floor(args.latency_requests)
    with tempfile.TemporaryDirectory(prefix="caraserve-bench-cp-") as tmp:
        phases, spans = run_stack(args, Path(tmp))
    result, samples = report(args, phases, spans, load_before, floor_ms)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(out.with_suffix(".png"), samples, phases["load"], (TARGET_P50_MS, TARGET_P99_MS), floor_ms)
    print(json.dumps(result, indent=1))
    return 0

