"""``caraserve up`` with API keys and NATS credentials, as a user runs it (issue 13 §3).

With ``CARASERVE_API_KEYS`` set, its own start-up calls (the model list, the demo) must still
work; NATS refuses anonymous clients, listens on loopback only, and the client credentials
that ``--nats-client-creds`` wrote work with ``caraserve generate --creds``, whose Ctrl-C
cancels the request with its cancel token.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import nats
import pytest

from shared import subjects
from shared.bus import connect
from shared.nats_auth import Credentials, read_credentials
from shared.schemas import CancelRequest
from tests.e2e.clients import OTEL_VARS
from tests.e2e.test_caraserve_up import REPO, STOP_TIMEOUT_S, read_lines, wait_for_serving

pytestmark = pytest.mark.timeout(180)

NATS_LINE = re.compile(r"NATS:\s+(nats://\S+)")


async def interrupt_generation(nats_url: str, operator: Credentials, command: list[str],
                               env: dict[str, str], stderr_path: Path) -> str:
    """Run ``caraserve generate``, Ctrl-C it as soon as its request reaches a worker; the request id
    the gateway then cancelled on the worker (watched as the operator). Interrupting on the worker's
    submit, not on the first output, keeps the generation unfinished however fast the engine is.
    The command's stderr goes to ``stderr_path`` and into any failure message."""
    nc = await nats.connect(nats_url, **operator.connect_options())
    try:
        submits = await nc.subscribe(subjects.any_worker("submit"))
        cancels = await nc.subscribe(subjects.any_worker("cancel"))
        await nc.flush()
        long = [arg if arg != "4" else "400" for arg in command]  # --max-tokens
        with stderr_path.open("w") as stderr:
            proc = await asyncio.create_subprocess_exec(*long, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE,
                                                        stderr=stderr)
            await submits.next_msg(timeout=60)
            proc.send_signal(signal.SIGINT)
            output = await asyncio.wait_for(proc.stdout.read(), 30)
            status = await asyncio.wait_for(proc.wait(), 30)
        assert status == 130, f"exit {status} after output {output[:80]!r}: {stderr_path.read_text()}"
        cancel = CancelRequest.decode((await cancels.next_msg(timeout=30)).data)
        return cancel.request_id
    finally:
        await nc.close()


def test_caraserve_up_with_api_keys_and_nats_credentials(tiny_model_dir, adapter_root, tmp_path):
    creds = tmp_path / "client.json"
    env = {k: v for k, v in os.environ.items() if k not in OTEL_VARS and not k.startswith("CARASERVE_NATS")}
    env.update(CARASERVE_DTYPE="float32", CARASERVE_NUM_KV_BLOCKS="64", PYTHONUNBUFFERED="1",
               CARASERVE_API_KEYS="key-a:alice", CARASERVE_TENANT_ADAPTERS="alice:*")
    cmd = [sys.executable, "-m", "launcher.cli", "up", "--http-port", "0", "--nats-port", "0", "--workers", "1",
           "--model", str(tiny_model_dir), "--adapter-dir", str(adapter_root), "--run-dir", str(tmp_path / "run"),
           "--nats-client-creds", str(creds)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _, output = wait_for_serving(read_lines(proc))  # the demo ran: the launcher's own key works
        nats_url = next(m.group(1) for m in map(NATS_LINE.search, output) if m)
        assert urlparse(nats_url).hostname == "127.0.0.1"
        assert oct(creds.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(ConnectionError, match="Authorization"):
            asyncio.run(connect(nats_url, "anonymous", connect_deadline_s=2))
        generate = [sys.executable, "-m", "launcher.cli", "generate", "--nats", nats_url, "--creds", str(creds),
                    "--api-key", "key-a", "--adapter", sorted(p.name for p in adapter_root.iterdir())[0],
                    "--max-tokens", "4", "--timeout", "60", "hello"]
        result = subprocess.run(generate, cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, result.stderr
        assert "completion tokens" in result.stderr
        operator = read_credentials(tmp_path / "run" / "nats" / "operator.json")
        cancelled = asyncio.run(interrupt_generation(nats_url, operator, generate[:-1] + ["tell me"], env,
                                                     tmp_path / "generate.stderr"))
        assert cancelled.startswith("cli-")  # Ctrl-C reached the worker as a cancel
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
