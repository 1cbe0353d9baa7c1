"""The scheduler service: serves ``caraserve.v1.route``, reads ``state.*``, forwards to workers.

For each RouteRequest (span ``scheduler.route``, child of the gateway's span):

1. the live workers that can serve the request (see :meth:`Fleet.candidates`) are offered
   to the Policy; with none, the route waits for a state change until the request's
   deadline, then publishes a terminal ``no_capacity`` Chunk to the request's inbox and
   answers with an ErrorReply;
2. the chosen worker gets the request counted as pending, then a WorkerSubmit on
   ``worker.<id>.submit``. Its SubmitAck confirms it; no responders (the worker is gone), a
   timeout (the submit is cancelled) or an ``overloaded`` refusal exclude that worker and
   the route tries again; any other refusal is terminal for the request;
3. the reply names the worker.

Each worker's profile is fetched once per digest its states name (``ProfileBook``), so
rank_aware prices every worker with its own model; ``--profile`` is only the reference for
workers whose profile is still pending.

Replicas share the ``route`` queue group, so each request is routed exactly once; each
replica reads every state message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from opentelemetry import trace

from services.scheduler.config import SchedulerConfig
from services.scheduler.decision_log import DecisionLog
from services.scheduler.fleet import Fleet
from services.scheduler.policies import NoCapacity, Policy, PolicyConfig, PolicyRequest, make_policy
from services.scheduler.profile_book import ProfileBook
from shared import subjects
from shared.background import cancel_and_wait, run_in_background
from shared.bus import Bus
from shared.config import from_env
from shared.nats_auth import load_credentials
from shared.schemas import (CancelRequest, Chunk, ErrorInfo, RemoteError, RequestLoad, RouteReply, RouteRequest,
                            SchemaError, ServiceError, SubmitAck, WorkerState, WorkerSubmit, error_info)
from shared.schemas.names import request_key
from shared.schemas.profile import ProfileReply, ProfileRequest
from shared.telemetry import Telemetry, setup_telemetry, span_from_headers

logger = logging.getLogger(__name__)

SERVICE_NAME = "caraserve-scheduler"
RETRYABLE_REFUSALS = ("overloaded", "no_capacity", "worker_lost")


class ChangeSignal:
    """Wakes every waiter at the next :meth:`notify` (a fresh Event per generation)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> bool:
        """True if notified within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True


def build_policy(config: SchedulerConfig, policy_config: PolicyConfig | None = None) -> Policy:
    """The Policy named by ``config.policy`` (tuned by ``policy_config``)."""
    tuned = dataclasses.replace(policy_config or PolicyConfig(), policy=config.policy)
    perf = None
    if config.profile:
        from shared.perf_model import PerfModel

        perf = PerfModel.load(config.profile)
    return make_policy(tuned, perf)


class SchedulerService:
    """One scheduler replica; :meth:`start` wires it onto an AsyncExitStack."""

    def __init__(self, config: SchedulerConfig, policy: Policy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.policy = policy or build_policy(config)
        self.clock = clock
        self.profiles = ProfileBook(self._ask_profile, clock)
        self.fleet = Fleet(config.dead_after_s, config.pending_ttl_s, self.profiles.model)
        self.bus: Bus | None = None
        self.telemetry: Telemetry | None = None
        self.routed = 0
        self.decisions: DecisionLog | None = None
        self._changed: ChangeSignal | None = None
        self._fetches: set[asyncio.Task] = set()  # profile fetches in flight

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> SchedulerService:
        """A scheduler configured from CARASERVE_* variables (docker-compose, ``caraserve service``)."""
        config = from_env(SchedulerConfig, environ)
        policy_env = {k: v for k, v in environ.items() if k != "CARASERVE_POLICY"}  # config.policy decides
        return cls(config, build_policy(config, from_env(PolicyConfig, policy_env)))

    @staticmethod
    def config_classes() -> tuple[type, ...]:
        """The config dataclasses :meth:`from_environ` reads."""
        return (SchedulerConfig, PolicyConfig)

    @property
    def healthy(self) -> bool:
        return self.bus is not None and self.bus.connected

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Connect, subscribe to worker states and serve ``route`` until the stack unwinds."""
        self.telemetry = setup_telemetry(SERVICE_NAME)
        stack.callback(self.telemetry.shutdown)
        self._changed = ChangeSignal()
        if self.config.decision_log:
            self.decisions = DecisionLog.open(self.config.decision_log, self.config.name, self.policy,
                                              self.config.profile)
            stack.callback(self.decisions.close)
        self.bus = await Bus.open(self.config.nats_url, self.config.name, stack, self.config.grace_s,
                                   load_credentials(self.config.nats_creds))
        stack.push_async_callback(self._cancel_fetches)
        await self.bus.listen(subjects.STATE_ALL, WorkerState, self._on_state)
        run_in_background(stack, self._reap(), "scheduler reaper")
        await self.bus.serve(subjects.ROUTE, RouteRequest, self._route, queue=self.config.queue_group)
        logger.info("scheduler %s serving %s (policy %s)", self.config.name, subjects.ROUTE, self.config.policy)

    def _on_state(self, state: WorkerState, msg: Msg) -> None:
        try:
            sender = subjects.worker_id_of_state(msg.subject)
        except subjects.SubjectError:
            return
        if sender != state.worker_id:
            logger.warning("state on %s names worker %s; ignored", msg.subject, state.worker_id)
            return
        self.fleet.observe(state, self.clock())
        if self.profiles.wanted(state.profile):
            task = asyncio.get_running_loop().create_task(self._fetch_profile(state))
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)
        assert self._changed is not None
        self._changed.notify()

    async def _fetch_profile(self, state: WorkerState) -> None:
        if await self.profiles.fetch(state.worker_id, state.profile, state.backend):
            self.fleet.profile_arrived(state.profile)
            assert self._changed is not None
            self._changed.notify()

    async def _cancel_fetches(self) -> None:
        for task in list(self._fetches):
            await cancel_and_wait(task)

    async def _ask_profile(self, worker_id: str, digest: str) -> ProfileReply:
        assert self.bus is not None
        return await self.bus.request(subjects.worker_profile(worker_id), ProfileRequest(digest=digest),
                                      ProfileReply, self.config.submit_timeout_s * 5)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.config.dead_after_s)
            self.fleet.expire(self.clock())

    async def _route(self, request: RouteRequest, msg: Msg) -> RouteReply:
        assert self.telemetry is not None
        attributes = {"request.id": request.request_id, "adapter": request.adapter or "",
                      "tokens": request.context_tokens(), "attempt": request.attempt, "tenant": request.tenant}
        with span_from_headers(self.telemetry.tracer, "scheduler.route", msg.headers, attributes) as span:
            ack = await self._place(request, span)
            span.set_attribute("worker.id", ack.worker_id)
            self.routed += 1
            return RouteReply(request_id=request.request_id, worker_id=ack.worker_id, state_seq=ack.state_seq,
                              instance=ack.instance)

    async def _place(self, request: RouteRequest, span: trace.Span) -> SubmitAck:
        assert self._changed is not None
        deadline = self.clock() + request.deadline_ms / 1000.0
        excluded = set(request.exclude_workers)
        rank = self.fleet.rank_of(request.adapter)
        span.set_attribute("rank", rank)
        load = RequestLoad(key=request_key(request.request_id), adapter=request.adapter, rank=rank,
                           prompt_tokens=len(request.prompt_token_ids),
                           generated_tokens=len(request.generated_token_ids),
                           remaining_tokens=request.remaining_tokens())
        while True:
            choice = self._choose(request, load, excluded)
            if isinstance(choice, str):
                ack = await self._submit(request, load, choice, deadline)
                if ack is not None:
                    return ack
                excluded.add(choice)
                continue
            remaining = deadline - self.clock()
            if remaining <= 0 or not await self._changed.wait(remaining):
                info = error_info("no_capacity", f"no worker can take this request now ({choice.reason})")
                await self._fail(request, info)
                raise ServiceError(info.code, info.message)

    def _choose(self, request: RouteRequest, load: RequestLoad, excluded: set[str]) -> str | NoCapacity:
        now = self.clock()
        records = self.fleet.candidates(request, now, excluded)
        wanted = PolicyRequest(rank=load.rank, prompt_tokens=load.context_tokens, adapter=request.adapter)
        started = time.perf_counter()
        if records:
            choice = self.policy.choose([r.view for r in records], wanted)
        else:
            what = f"model {request.model!r}" + (f" with adapter {request.adapter!r}" if request.adapter else "")
            choice = NoCapacity(f"no live worker serves {what}")
        if self.decisions is not None:
            self.decisions.record(request.request_id, request.attempt, wanted, records, excluded, choice, now,
                                  time.perf_counter() - started)
        return choice

    async def _submit(self, request: RouteRequest, load: RequestLoad, worker_id: str,
                      deadline: float) -> SubmitAck | None:
        """Forward to ``worker_id``; its ack once it acknowledged, None to try another worker."""
        assert self.bus is not None
        self.fleet.reserve(worker_id, load, self.clock())
        timeout = min(self.config.submit_timeout_s, max(deadline - self.clock(), 0.05))
        submit = WorkerSubmit.from_route(request, worker_id)
        try:
            ack = await self.bus.request(subjects.worker_submit(worker_id), submit, SubmitAck, timeout)
        except NoRespondersError:
            self.fleet.forget(worker_id)
            return None
        except asyncio.TimeoutError:
            logger.warning("worker %s did not acknowledge %s in %.2fs", worker_id, request.request_id, timeout)
            await self._cancel_on(worker_id, request.request_id)
            return None
        except SchemaError as exc:
            logger.error("worker %s answered %s with a bad ack: %s", worker_id, request.request_id, exc)
            await self._cancel_on(worker_id, request.request_id)
            return None
        except RemoteError as exc:
            self.fleet.release(worker_id, request.request_id)
            if exc.info.code in RETRYABLE_REFUSALS:
                return None
            await self._fail(request, exc.info)
            raise ServiceError.from_info(exc.info) from exc
        self.fleet.confirm(worker_id, request.request_id, ack.state_seq)
        return ack

    async def _cancel_on(self, worker_id: str, request_id: str) -> None:
        assert self.bus is not None
        self.fleet.release(worker_id, request_id)
        await self.bus.publish(subjects.worker_cancel(worker_id), CancelRequest(request_id=request_id))

    async def _fail(self, request: RouteRequest, info: ErrorInfo) -> None:
        """Send the request's terminal error chunk to its inbox."""
        assert self.bus is not None
        chunk = Chunk(request_id=request.request_id, index=0, finish_reason="error", error=info)
        await self.bus.publish(request.reply_inbox, chunk)
