"""Runs the engine's step loop on its own thread so the service's event loop keeps serving.

After every step the thread hands the step's outputs and a snapshot of the engine's load
to ``on_step`` (called on the step thread; the service forwards it to its event loop).
When nothing can run, the thread blocks until a request arrives or a load progresses.
The engine contains failures of single steps itself; anything that still escapes ends the
thread, is kept in ``error`` and handed to ``on_death`` (on the step thread), so the service
can take the worker out of service instead of staying up without an engine.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from services.gpu_worker.engine import EngineStats, LLMEngine
from services.gpu_worker.request import RequestOutput

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1


class StepThread:
    def __init__(self, engine: LLMEngine, on_step: Callable[[list[RequestOutput], EngineStats], None],
                 on_death: Callable[[BaseException], None] | None = None) -> None:
        self.engine, self.on_step, self.on_death = engine, on_step, on_death
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.engine.wake()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                outputs = self.engine.step()
                if outputs or not self.engine.idle:
                    self.on_step(outputs, self.engine.stats())
                if self.engine.idle and not outputs:
                    self.engine.wait_for_work(IDLE_WAIT_S)
        except BaseException as exc:  # surfaced by the service's health, never silently lost
            log.exception("engine step loop died")
            self.error = exc
            if self.on_death is not None:
                self.on_death(exc)
