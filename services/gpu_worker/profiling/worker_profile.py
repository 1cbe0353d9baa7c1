"""This worker's own performance profile: finding it, making it when missing, and publishing it.

At start the worker looks in the profile cache (``profile_cache.py``) for a profile of its
model digest, device name, dtype and each kernel family it may run (both for backend
``auto``, else its own). Missing ones are made by a quick grid in a child process,
``caraserve profile --quick --if-missing``, while the worker serves; the child's progress
goes to the worker's log, and the worker's state says ``profile: pending``. Then, for
``auto``, the worker picks its family (``backend_choice.py``) and switches the engine to it;
it publishes the chosen family's profile digest in its state and serves the JSON on
``worker.<id>.profile``. An explicit ``--profile FILE`` is checked against the worker's
model, device, dtype and family at start (a mismatch stops the worker with one line) and used
as is. Every ``REFRESH_S`` the worker re-reads the cache, so a full ``caraserve profile``
made meanwhile supersedes the quick profile.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.gpu_worker.profiling.backend_choice import faster_backend
from services.gpu_worker.profiling.profile_cache import ProfileKey, model_digest, profile_digest
from shared.backends import AUTO, BACKENDS
from shared.parent_death import die_with_parent
from shared.perf_model import PerfModel, ProfileError, current_device_name

logger = logging.getLogger(__name__)

REFRESH_S = 10.0  # how often the cache is re-read for a superseding profile
MAKE_TIMEOUT_S = 900.0  # a quick profile that takes longer has failed
PROGRESS_LOG_S = 5.0  # at most one progress line per this many seconds (and one per stage)
PENDING, FAILED, NONE = "pending", "failed", ""


@dataclass(frozen=True)
class Published:
    """The profile a worker serves with: its family, model, JSON text and digest."""

    backend: str
    model: PerfModel
    text: str
    digest: str

    @classmethod
    def of(cls, backend: str, model: PerfModel, text: str) -> Published:
        return cls(backend, model, text, profile_digest(text))


@dataclass(frozen=True)
class ProfileSettings:
    """What the worker's profile must match, and how to make one."""

    model_dir: Path
    dtype: str
    device: str  # the resolved torch device ("cpu", "cuda")
    backend: str  # bgmv, mbgmv or auto
    explicit: str = ""  # --profile FILE; empty: the cache
    make: bool = True  # make a quick profile when the cache has none
    emulate_link_gbps: float = 0.0
    emulate_link_latency_ms: float = 0.0

    def keys(self) -> dict[str, ProfileKey]:
        digest, device_name = model_digest(self.model_dir), current_device_name(self.device)
        families = BACKENDS if self.backend == AUTO else (self.backend,)
        return {b: ProfileKey(digest, device_name, self.dtype, b) for b in families}

    def make_command(self) -> list[str]:
        return [sys.executable, "-m", "launcher.cli", "profile", "--quick", "--if-missing",
                "--backend", self.backend, "--model", str(self.model_dir), "--dtype", self.dtype,
                "--device", self.device, "--emulate-link-gbps", str(self.emulate_link_gbps),
                "--emulate-link-latency-ms", str(self.emulate_link_latency_ms)]


class WorkerProfile:
    """The worker's profile; ``status`` is what its state reports (see the module docstring)."""

    def __init__(self, settings: ProfileSettings, served_ranks: Callable[[], Sequence[int]]) -> None:
        self.settings = settings
        self.served_ranks = served_ranks
        self.keys = settings.keys()
        self.published: Published | None = None
        self._digests: dict[str, str] = {}  # of each family's cached profile, at the last publish
        self._status = PENDING if settings.explicit or settings.make else NONE
        self._explicit = self._load_explicit() if settings.explicit else None  # refused here, at start

    @property
    def status(self) -> str:
        """``pending``, ``failed``, "" (none kept) or the published profile's digest."""
        return self.published.digest if self.published else self._status

    def _load_explicit(self) -> Published:
        """The --profile FILE, checked against this worker; ProfileError (one line) when it does not fit."""
        key = next(iter(self.keys.values()))
        path = self.settings.explicit
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"cannot read profile {path}: {exc}") from None
        model = PerfModel.from_text(text, path)
        model.check(expect_model_digest=key.model_digest, expect_device=key.device_name, where=path,
                    expect_backend=None if self.settings.backend == AUTO else self.settings.backend,
                    expect_dtype=key.dtype)
        return Published.of(model.backend, model, text)

    async def run(self, on_change: Callable[[Published], None]) -> None:
        """Find or make the profile, publish it through ``on_change``, then follow the cache."""
        if self._explicit is not None:
            self.published = self._explicit
            on_change(self._explicit)
            return
        loaded = self._cached()
        if loaded is None and self.settings.make:
            await self._make()
            loaded = self._cached()
        if loaded is None:
            self._status = FAILED if self.settings.make else NONE
            if self.settings.make:
                logger.error("no profile after the quick grid; rank_aware prices this worker with a fallback")
            return
        self._publish(loaded, on_change)
        while True:
            await asyncio.sleep(REFRESH_S)
            loaded = self._cached()
            if loaded is not None and self._differs(loaded):
                self._publish(loaded, on_change)

    def _cached(self) -> dict[str, tuple[PerfModel, str]] | None:
        """Every family's cached (model, text), or None while one is missing."""
        found = {}
        for backend, key in self.keys.items():
            loaded = key.load()
            if loaded is None:
                return None
            found[backend] = loaded
        return found

    def _differs(self, loaded: Mapping[str, tuple[PerfModel, str]]) -> bool:
        assert self.published is not None
        return any(profile_digest(text) != self._digests.get(b) for b, (_, text) in loaded.items())

    def _publish(self, loaded: Mapping[str, tuple[PerfModel, str]], on_change: Callable[[Published], None]) -> None:
        self._digests = {b: profile_digest(text) for b, (_, text) in loaded.items()}
        models = {b: model for b, (model, _) in loaded.items()}
        backend, costs = faster_backend(models, self.served_ranks())
        if len(models) > 1:
            logger.info("backend auto: %s (predicted us per output token: %s)", backend,
                        ", ".join(f"{b} {c:.0f}" for b, c in costs.items()))
        model, text = loaded[backend]
        self.published = Published.of(backend, model, text)
        logger.info("profile %s ready (%s grid, backend %s)", self.published.digest, model.info.grid, backend)
        on_change(self.published)

    async def _make(self) -> None:
        """Run the quick grid in a child process; its progress goes to this worker's log."""
        logger.info("no cached profile for this model and device: making a quick one (serving meanwhile)")
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *self.settings.make_command(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent(signal.SIGTERM))
        try:
            await asyncio.wait_for(_relay_progress(proc.stderr), MAKE_TIMEOUT_S)
            code = await proc.wait()
        except asyncio.TimeoutError:
            logger.error("the quick profile took over %.0fs; stopped", MAKE_TIMEOUT_S)
            code = None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if code == 0:
            logger.info("quick profile made in %.0fs", time.monotonic() - started)
        elif code is not None:
            logger.error("the quick profile failed (exit %s)", code)


async def _relay_progress(stream: asyncio.StreamReader) -> None:
    """Log the profiler's progress lines (``\r``-separated): each stage's first and last line, and
    at most one line per PROGRESS_LOG_S in between."""
    stage, last, tail = "", 0.0, b""
    while chunk := await stream.read(4096):
        *lines, tail = re.split(rb"[\r\n]", tail + chunk)
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            now, line_stage = time.monotonic(), line.split(":", 1)[0]
            if line_stage != stage or now - last >= PROGRESS_LOG_S or _stage_done(line):
                logger.info("profile: %s", line)
                stage, last = line_stage, now


def _stage_done(line: str) -> bool:
    """Whether a progress line ``"<stage>: k/n grid points"`` is its stage's last (k == n)."""
    match = re.search(r"(\d+)/(\d+) grid points$", line)
    return match is not None and match.group(1) == match.group(2)
