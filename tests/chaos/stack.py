"""The stack the reliability suites (fuzz, chaos, overload) run against, and how they look at it.

It is what ``caraserve up`` runs (launcher.local_stack.LocalStack) on the tiny fp32 model and the
tiny PEFT adapters, without telemetry export, with a short context (``MAX_MODEL_LEN``) so that
no request, however hostile, generates for long. The helpers find every process of the stack
(services and nats-server) to check that each is alive, to signal one, and to read its RSS.

NATS clients log in as a real NATS API client would (:func:`client_credentials`, the identity
``--nats-client-creds`` writes), or with the stack's operator identity to reach internal subjects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from launcher.local_stack import LocalStack, StackConfig
from shared.nats_auth import Credentials

MAX_MODEL_LEN = 128
BASE_ENV = {"CARASERVE_DTYPE": "float32", "CARASERVE_NUM_KV_BLOCKS": "256", "OTEL_SDK_DISABLED": "true",
            "CARASERVE_MAX_MODEL_LEN": str(MAX_MODEL_LEN)}
NATS = "nats-server"
CLIENT = "client-0"  # the credentials key of the first --nats-client-creds identity
SUPERVISE_INTERVAL_S = 0.25  # as caraserve up's serve loop


def copy_adapters(adapters: dict[str, Path], root: Path) -> Path:
    """``root`` holding a copy of every adapter (the workers' registry refuses symlinks out of the root)."""
    for name, path in adapters.items():
        shutil.copytree(path, root / name)
    return root


def stack_config(model_dir: Path, adapters: dict[str, Path], run_dir: Path, *, workers: int = 2,
                 schedulers: int = 1, env: dict[str, str] | None = None) -> StackConfig:
    """A LocalStack config on the tiny model with the tiny adapters copied under ``run_dir``."""
    adapter_root = copy_adapters(adapters, run_dir / "adapters")
    return StackConfig(model=str(model_dir), adapter_dir=str(adapter_root), http_port=0, nats_port=0,
                       workers=workers, schedulers=schedulers, ready_timeout_s=120, run_dir=str(run_dir / "run"),
                       nats_client_creds=(str(run_dir / "client-creds.json"),), extra_env={**BASE_ENV, **(env or {})})


def client_credentials(stack: LocalStack) -> Credentials:
    """The NATS API client identity (publishes generate, cancel, adapters.list; reads its own inboxes)."""
    assert stack.creds is not None
    return stack.creds.credentials(CLIENT)


def operator_credentials(stack: LocalStack) -> Credentials:
    """The operator identity (every subject): for probing internal subjects."""
    assert stack.creds is not None
    return stack.creds.credentials("operator")


@contextlib.contextmanager
def supervised(stack: LocalStack) -> Iterator[LocalStack]:
    """Run the stack's supervisor as ``caraserve up`` does (a dead process is restarted) while inside."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(SUPERVISE_INTERVAL_S):
            stack.supervise()
    thread = threading.Thread(target=loop, name="supervise", daemon=True)
    thread.start()
    try:
        yield stack
    finally:
        stop.set()
        thread.join()


def nats_process(stack: LocalStack) -> psutil.Process | None:
    """The nats-server listening on the stack's NATS port (found by port: it may have been restarted)."""
    port = int(stack.nats_url.rsplit(":", 1)[1])
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.name() == NATS and any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                                           for c in proc.net_connections("tcp")):
                return proc
    return None


def processes(stack: LocalStack) -> dict[str, psutil.Process | None]:
    """Every process of the stack by name (None: not running)."""
    out: dict[str, psutil.Process | None] = {}
    for name, popen in stack.procs.items():
        out[name] = psutil.Process(popen.pid) if popen.poll() is None else None
    out[NATS] = nats_process(stack)
    return out


def dead(stack: LocalStack) -> list[str]:
    """Names of the stack's processes that are not running."""
    return sorted(name for name, proc in processes(stack).items() if proc is None or not _alive(proc))


def _alive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.status() != psutil.STATUS_ZOMBIE
    return False


def rss_mib(stack: LocalStack) -> dict[str, float]:
    """Resident memory of every live process of the stack, in MiB."""
    out = {}
    for name, proc in processes(stack).items():
        with contextlib.suppress(psutil.Error, AttributeError):
            out[name] = proc.memory_info().rss / 2**20
    return out


def health(stack: LocalStack, timeout_s: float = 2.0) -> tuple[int, dict]:
    """The gateway's /health status and body (0 and {} when it does not answer)."""
    try:
        with urllib.request.urlopen(f"{stack.http_url}/health", timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return 0, {}


def whole(stack: LocalStack) -> bool:
    """The gateway is healthy and sees every worker of the stack live."""
    status, body = health(stack)
    return status == 200 and len(body.get("workers", [])) >= stack.config.workers


def completion(stack: LocalStack, model: str, prompt: str = "hello", max_tokens: int = 4,
               timeout_s: float = 10.0) -> tuple[int, dict]:
    """One small non-streaming greedy completion over HTTP: (status, body); (0, {}) when unreachable."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{stack.http_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return 0, {}


def base_model(stack: LocalStack) -> str:
    """The base model's served name."""
    with urllib.request.urlopen(f"{stack.http_url}/v1/models", timeout=5) as resp:
        models = json.loads(resp.read())["data"]
    return next(m["id"] for m in models if m.get("parent") is None)


def adapter_names(stack: LocalStack) -> list[str]:
    with urllib.request.urlopen(f"{stack.http_url}/v1/models", timeout=5) as resp:
        models = json.loads(resp.read())["data"]
    return sorted(m["id"] for m in models if m.get("parent") is not None)


async def wait_serving(stack: LocalStack, model: str, timeout_s: float) -> float | None:
    """Seconds until a small completion succeeds (None: not within ``timeout_s``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        status, _ = await asyncio.to_thread(completion, stack, model, timeout_s=max(0.5, timeout_s / 3))
        if status == 200:
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    return None


class ReusedStack:
    """One stack shared by a suite's tests: started on first use, and started afresh when the
    previous test left it broken (a process dead, or no completion served), so that one failure
    does not cascade into the next test. ``supervise`` runs the supervisor as ``caraserve up`` does
    (the chaos suite); without it a crash stays visible (the fuzz and overload suites)."""

    def __init__(self, config: StackConfig, supervise: bool) -> None:
        self.config = config
        self.supervise = supervise
        self.stack: LocalStack | None = None
        self.restarts = 0
        self._supervision = contextlib.ExitStack()

    def get(self) -> LocalStack:
        if self.stack is not None and not self._serves(self.stack):
            self.close()
            self.restarts += 1
        if self.stack is None:
            self.stack = LocalStack(self.config)
            self.stack.start()
            if self.supervise:
                self._supervision.enter_context(supervised(self.stack))
        return self.stack

    def _serves(self, stack: LocalStack, timeout_s: float = 20.0) -> bool:
        """No process dead, a completion served, and (within ``timeout_s``) every worker live again."""
        if dead(stack) or completion(stack, base_model(stack))[0] != 200:
            return False
        deadline = time.monotonic() + timeout_s
        while not whole(stack):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def close(self) -> None:
        self._supervision.close()
        if self.stack is not None:
            self.stack.stop()
            self.stack = None
