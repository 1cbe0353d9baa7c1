"""The environment `caraserve up` gives each gpu_worker process."""

from __future__ import annotations

import os

from launcher.local_stack import LocalStack, StackConfig
from launcher.stack_credentials import StackCredentials
from shared.nats_server import NatsServer


def worker_env(monkeypatch, tmp_path, workers: int, index: int, omp: str | None = None) -> dict[str, str]:
    if omp is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", omp)
    monkeypatch.delenv("CARASERVE_NUM_THREADS", raising=False)
    stack = LocalStack(StackConfig(workers=workers, http_port=0, nats_port=0, run_dir=str(tmp_path)))
    stack.nats = NatsServer()  # never started: only its (empty) url is read
    stack.creds = StackCredentials.generate(tmp_path / "nats", schedulers=1, workers=workers)
    return stack._worker_env(index)


def test_workers_sleep_their_openmp_threads_and_share_the_cores(monkeypatch, tmp_path):
    env = worker_env(monkeypatch, tmp_path, workers=2, index=1)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["CARASERVE_WORKER_ID"] == "worker-1"
    assert env["CARASERVE_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "CARASERVE_NUM_THREADS" not in worker_env(monkeypatch, tmp_path, workers=1, index=0)


def test_an_explicit_openmp_wait_policy_is_kept(monkeypatch, tmp_path):
    assert worker_env(monkeypatch, tmp_path, workers=1, index=0, omp="ACTIVE")["OMP_WAIT_POLICY"] == "ACTIVE"
