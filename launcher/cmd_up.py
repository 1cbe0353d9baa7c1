"""`caraserve up`: run the whole stack locally on loopback until Ctrl-C or SIGTERM.

It starts nats-server, the scheduler, the gpu_worker(s), their CPU prefill pools and the
gateway (default model and demo adapters unless told otherwise), prints the endpoints with
copy-paste examples, waits (showing progress) while each worker finds or makes its
performance profile, then sends demo requests through the gateway: a cold adapter's first
request (CPU-assisted in cpu_assist mode, with its time to first token), the same adapter
warm, and a few mixed requests. Then it serves. While it
serves, a service that dies is restarted with backoff (one log line each time); only Ctrl-C
or SIGTERM stops the stack.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.request

from launcher.cli import CliError
from launcher.metrics_ports import metrics_listing
from shared.config import ConfigError, add_arguments, from_namespace

DEMO_PROMPTS = ("Give me one tip for writing clean code.", "What is the capital of France?",
                "Write a haiku about GPUs.", "Name three uses of LoRA adapters.")
SUPERVISE_INTERVAL_S = 0.25  # how often the serve loop looks for services that died
PROFILE_WAIT_S = 300.0  # the demo waits this long at most for the workers' profiles
COLD_DEMO_PROMPT = "Explain in one sentence what a LoRA adapter is."


def register(subparsers) -> None:
    from launcher.local_stack import StackConfig

    p = subparsers.add_parser("up", help="run the whole stack locally (Ctrl-C stops it)")
    add_arguments(p, StackConfig)
    p.add_argument("--no-demo", action="store_true", help="skip the demo requests at start-up")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from launcher.local_stack import LocalStack, StackConfig, StackError
    from shared.model_store import ModelStoreError

    try:
        config = from_namespace(StackConfig, args)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(config)
    print(f"starting CaraServe ({config.workers} worker(s); logs in {stack.run_dir}) ...", file=sys.stderr)
    try:
        stack.start()
    except (StackError, ModelStoreError) as exc:
        raise CliError(str(exc)) from None
    try:
        print_endpoints(stack)
        if not args.no_demo:
            wait_for_profiles(stack)
            run_cold_demo(stack)
            run_demo(stack)
        print("serving; Ctrl-C stops everything", flush=True)
        while not stop.wait(SUPERVISE_INTERVAL_S):
            stack.supervise()  # a service that died is restarted; the others serve on
    finally:
        print("stopping ...", file=sys.stderr)
        stack.stop()
    return 0


def launcher_headers(stack) -> dict[str, str]:
    """Headers of the launcher's own HTTP calls: with API keys configured, its per-run admin key."""
    return {"Authorization": f"Bearer {stack.admin_key}"} if stack.admin_key else {}


def models(stack) -> list[dict]:
    req = urllib.request.Request(f"{stack.http_url}/v1/models", headers=launcher_headers(stack))
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["data"]


def print_endpoints(stack) -> None:
    names = [m["id"] for m in models(stack)]
    adapter = next((m["id"] for m in models(stack) if m.get("parent")), names[0])
    client_creds = stack.config.nats_client_creds
    creds_flag = f"--creds {client_creds[0]}" if client_creds else "--creds FILE"
    creds_note = "" if client_creds else "\n  (NATS needs a login: restart with --nats-client-creds FILE for one)"
    key_header = " -H 'Authorization: Bearer YOUR_KEY'" if stack.admin_key else ""
    key_flag = " --api-key YOUR_KEY" if stack.admin_key else ""
    print(f"""
CaraServe is up.
  HTTP (OpenAI-compatible): {stack.http_url}/v1   models: {', '.join(names)}
  NATS:                     {stack.nats_url}   subject caraserve.v1.generate (login required)
{metrics_listing(stack.metrics_ports)}
Try:
  curl -s {stack.http_url}/v1/completions -H 'Content-Type: application/json'{key_header} \\
       -d '{{"model": "{adapter}", "prompt": "The capital of France is", "max_tokens": 16}}'
  caraserve generate --nats {stack.nats_url} {creds_flag}{key_flag} --adapter {adapter} "The capital of France is"\
{creds_note}
""", flush=True)


def wait_for_profiles(stack) -> None:
    """Wait until no worker's profile is pending, showing the profiler's progress from the worker logs;
    then print each worker's kernel family and profile."""
    deadline = time.monotonic() + PROFILE_WAIT_S
    profiles = stack.health().get("worker_info", {})
    while any(p["profile"] == "pending" for p in profiles.values()) and time.monotonic() < deadline:
        line = stack.profile_progress()
        print(f"\rprofiling this machine (quick grid, serving meanwhile): {line:<60}", end="", file=sys.stderr,
              flush=True)
        time.sleep(1.0)
        profiles = stack.health().get("worker_info", profiles)
    print(file=sys.stderr)
    print(f"routing: {stack.config.policy}; cold starts: {stack.config.cold_start}", flush=True)
    for worker, p in sorted(profiles.items()):
        status = p["profile"] or "none kept"
        print(f"  {worker}: backend {p['backend']} ({stack.config.backend}), profile {status}", flush=True)


def run_cold_demo(stack) -> None:
    """The highest-rank adapter's first request (cold: CPU-assisted in cpu_assist mode), then the same
    adapter warm, each with its time to first token and how its prefill got its LoRA deltas."""
    adapters = [m for m in models(stack) if m.get("parent")]
    if not adapters:
        return
    adapter = max(adapters, key=lambda m: m.get("rank", 0))["id"]
    for label in ("cold", "warm"):
        ttft_ms, text, usage = stream_completion(stack, adapter, COLD_DEMO_PROMPT)
        lora = usage.get("prefill_lora") or {}
        layers = lora.get("cpu_layers", 0) + lora.get("device_layers", 0)
        how = (f"CPU-assisted: {lora['cpu_layers']} of {layers} layers' LoRA deltas from the CPU prefill pool"
               if lora.get("cpu_layers") else
               f"deltas on the device (waited {lora.get('waited_ms', 0.0):.0f} ms for the adapter)")
        print(f"[{adapter}] {label}: first token after {ttft_ms:.0f} ms; {how}\n  -> {text.strip()}\n", flush=True)


def stream_completion(stack, model: str, prompt: str) -> tuple[float, str, dict]:
    """(ms to the first streamed token, the text, the usage) of one streamed chat completion."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{stack.http_url}/v1/chat/completions", body,
                                 {"Content-Type": "application/json", **launcher_headers(stack)})
    started, first, parts, usage = time.monotonic(), None, [], {}
    with urllib.request.urlopen(req, timeout=120) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            for choice in event.get("choices", []):
                delta = choice.get("delta", {}).get("content") or ""
                if delta and first is None:
                    first = time.monotonic()
                parts.append(delta)
            usage = event.get("usage") or usage
    return ((first or time.monotonic()) - started) * 1e3, "".join(parts), usage


def run_demo(stack) -> None:
    """A few requests over HTTP, mixing adapters and the base model; prints each answer."""
    names = [m["id"] for m in models(stack)]
    for i, prompt in enumerate(DEMO_PROMPTS):
        model = names[i % len(names)]
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": 32, "temperature": 0}).encode()
        req = urllib.request.Request(f"{stack.http_url}/v1/chat/completions", body,
                                     {"Content-Type": "application/json", **launcher_headers(stack)})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())["choices"][0]["message"]["content"]
        print(f"[{model}] {prompt}\n  -> {answer.strip()}\n", flush=True)
