"""`caraserve up`: run the whole stack locally on loopback until Ctrl-C or SIGTERM.

It starts nats-server, the scheduler, the gpu_worker(s) and the gateway (default model
and demo adapters unless told otherwise), sends a few mixed requests through the gateway
so you see it working, prints the endpoints with copy-paste examples, then serves. While it
serves, a service that dies is restarted with backoff (one log line each time); only Ctrl-C
or SIGTERM stops the stack.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.request

from launcher.cli import CliError
from shared.config import ConfigError, add_arguments, from_namespace

DEMO_PROMPTS = ("Give me one tip for writing clean code.", "What is the capital of France?",
                "Write a haiku about GPUs.", "Name three uses of LoRA adapters.")
SUPERVISE_INTERVAL_S = 0.25  # how often the serve loop looks for services that died


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

Try:
  curl -s {stack.http_url}/v1/completions -H 'Content-Type: application/json'{key_header} \\
       -d '{{"model": "{adapter}", "prompt": "The capital of France is", "max_tokens": 16}}'
  caraserve generate --nats {stack.nats_url} {creds_flag}{key_flag} --adapter {adapter} "The capital of France is"\
{creds_note}
""", flush=True)


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
