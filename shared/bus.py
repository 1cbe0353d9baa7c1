"""The NATS bus every service uses: connection, typed publish/request/serve, and the service runner.

- :func:`connect` opens a connection that reconnects forever (and retries the first connect
  until a deadline, so services may start before nats-server does). The URL may list several
  servers of one NATS cluster, comma-separated: the first is preferred (list the host's own node
  first), the others take over when it fails. With credentials (shared/nats_auth.py) it logs in
  and puts its reply inboxes under the identity's own inbox prefix.
- :class:`Bus` wraps it with typed messages from :mod:`shared.schemas`. Outgoing messages carry
  the current W3C trace context in their headers. Handlers registered with :meth:`Bus.serve`
  run as tasks; a payload that fails validation, or a handler that raises ServiceError, gets a
  typed ErrorReply instead of an exception, and an unexpected handler error is logged and
  answered with ``internal_error``. Nothing a peer sends can stop a service.
- :func:`run_service` runs a service on uvloop until SIGTERM/SIGINT sets an Event (:func:`service_main`
  is the services' ``python -m`` entry around it); cleanup goes
  through an AsyncExitStack (the Bus registers its own graceful :meth:`Bus.close`, which stops
  taking requests, lets handlers finish, then drains the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoServersError

from shared.config import ConfigError
from shared.nats_auth import Credentials
from shared.schemas import ErrorReply, Message, SchemaError, ServiceError, decode_reply, error_info, schema_error_info
from shared.schemas.errors import ErrorInfo
from shared.telemetry import inject_headers

logger = logging.getLogger(__name__)

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
M = TypeVar("M", bound=Message)
Handler = Callable[[Any, Msg], Awaitable[Message | None]]
ErrorReplyFactory = Callable[[ErrorInfo, bytes], Message]


def server_list(url: str) -> list[str]:
    """The servers of a comma-separated ``url`` ("nats://a:4222,nats://b:4222"), in order."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


async def connect(url: str, name: str, *, credentials: Credentials | None = None, connect_deadline_s: float = 30.0,
                  reconnect_wait_s: float = 0.5) -> NATS:
    """Connect to ``url`` (one server or a comma-separated list) as client ``name``, logged in
    with ``credentials`` when given; keep reconnecting forever once connected.

    The first connect is retried with backoff until ``connect_deadline_s`` passes (ConnectionError
    after it). A refused login is not retried: ConnectionError at once.
    """
    deadline = time.monotonic() + connect_deadline_s
    delay = 0.05
    servers = server_list(url)
    login = credentials.connect_options() if credentials is not None else {}
    while True:
        try:
            # nats-py applies the reconnect options to the first connect too (with unlimited
            # attempts it would never fail): connect with a bounded policy, then switch to
            # reconnecting forever for the life of the connection.
            nc = await nats.connect(
                servers=servers, name=name, allow_reconnect=False, max_reconnect_attempts=1,
                reconnect_time_wait=0.01, connect_timeout=2, dont_randomize=True,
                error_cb=_log_error(name), disconnected_cb=_log_event(name, "disconnected"),
                reconnected_cb=_log_event(name, "reconnected"), **login)
        except (NoServersError, OSError, asyncio.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"{name}: cannot reach NATS at {url}: {exc}") from exc
            logger.info("%s: NATS at %s not reachable yet (%s); retrying", name, url, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        except nats.errors.Error as exc:  # a refused login: retrying will not help
            raise ConnectionError(f"{name}: NATS at {url} refused the connection: {exc}") from exc
        nc.options.update(allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=reconnect_wait_s)
        return nc


def _log_error(name: str) -> Callable[[Exception], Awaitable[None]]:
    async def on_error(exc: Exception) -> None:
        logger.info("%s: NATS error: %s", name, exc)
    return on_error


def _log_event(name: str, event: str) -> Callable[[], Awaitable[None]]:
    async def on_event() -> None:
        logger.info("%s: NATS %s", name, event)
    return on_event


async def yield_to_io() -> None:
    """Let the loop first run what the current step made ready: the tasks it woke (a chunk's
    consumer, say) and the NATS flusher those wake in turn, which writes to the socket.

    Bookkeeping that is off the client's path (spans, metrics) awaits this first. asyncio
    runs ready callbacks in FIFO order, so two passes put us behind both.
    """
    for _ in range(2):
        await asyncio.sleep(0)


class TaskSet:
    """Background tasks a service owns: spawned, tracked, and awaited or cancelled on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the tasks to finish, then cancel the rest."""
        if self._tasks and grace_s > 0:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class Bus:
    """A NATS connection that speaks typed messages (see the module docstring)."""

    def __init__(self, nc: NATS, name: str) -> None:
        self.nc = nc
        self.name = name
        self.tasks = TaskSet()
        self._intake: list[Subscription] = []  # serve(): stopped first on close

    @classmethod
    async def open(cls, url: str, name: str, stack: contextlib.AsyncExitStack | None = None,
                   grace_s: float = 5.0, credentials: Credentials | None = None) -> Bus:
        """Connect (logged in with ``credentials`` when given); when ``stack`` is given, a
        graceful :meth:`close` is registered on it."""
        bus = cls(await connect(url, name, credentials=credentials), name)
        if stack is not None:
            stack.push_async_callback(bus.close, grace_s)
        return bus

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established (messages in flight then may be lost)."""
        return self.nc.stats["reconnects"]

    async def publish(self, subject: str, message: Message,
                      headers: Mapping[str, str] | None = None, reply: str = "") -> None:
        """Publish ``message`` with the current trace context in its headers."""
        await self.nc.publish(subject, message.encode(), reply=reply,
                              headers=inject_headers(dict(headers) if headers else None))

    async def request(self, subject: str, message: Message, reply_cls: type[M], timeout: float,
                      headers: Mapping[str, str] | None = None) -> M:
        """Send a request and decode its reply as ``reply_cls``.

        Raises RemoteError when the peer answers with an ErrorReply, SchemaError when the reply
        is malformed, and nats' NoRespondersError / TimeoutError when nobody answers.
        """
        msg = await self.nc.request(subject, message.encode(), timeout=timeout,
                                    headers=inject_headers(dict(headers) if headers else None))
        return decode_reply(msg.data, reply_cls)

    async def serve(self, subject: str, request_cls: type[M], handler: Handler, *, queue: str = "",
                    error_reply: ErrorReplyFactory | None = None, concurrent: bool = True) -> Subscription:
        """Answer requests on ``subject``: decode as ``request_cls``, run ``handler`` in a task.

        ``handler(request, msg)`` returns the reply message (or None to send nothing, e.g. when
        it streams to an inbox itself). Errors become ``error_reply(info, payload)`` (default: an
        ErrorReply) sent to ``msg.reply``. With ``concurrent`` False the handler runs in the
        subscription's own task, one message at a time and without a task of its own: for
        handlers that never wait long, it saves a loop pass per message.
        """
        make_error = error_reply or _default_error_reply

        async def on_msg(msg: Msg) -> None:
            if concurrent:
                self.tasks.spawn(self._handle(msg, request_cls, handler, make_error), name=f"serve {subject}")
            else:
                await self._handle(msg, request_cls, handler, make_error)

        sub = await self._subscribe(subject, queue, on_msg)
        self._intake.append(sub)
        return sub

    async def listen(self, subject: str, message_cls: type[M], handler: Callable[[M, Msg], None],
                     *, queue: str = "") -> Subscription:
        """Feed every valid ``message_cls`` on ``subject`` to the synchronous ``handler``.

        Invalid payloads are logged and dropped (there is nobody to answer).
        """
        async def on_msg(msg: Msg) -> None:
            try:
                message = message_cls.decode(msg.data)
            except SchemaError as exc:
                logger.warning("%s: dropped a bad %s on %s: %s", self.name, message_cls.KIND, msg.subject, exc)
                return
            handler(message, msg)

        return await self._subscribe(subject, queue, on_msg)

    async def _subscribe(self, subject: str, queue: str, cb: Callable[[Msg], Awaitable[None]]) -> Subscription:
        """Subscribe and wait until the server has registered the interest (a PING round trip)."""
        sub = await self.nc.subscribe(subject, queue=queue, cb=cb)
        await self.nc.flush()
        return sub

    async def _handle(self, msg: Msg, request_cls: type[M], handler: Handler,
                      make_error: ErrorReplyFactory) -> None:
        try:
            request = request_cls.decode(msg.data)
            reply = await handler(request, msg)
        except SchemaError as exc:
            reply = make_error(schema_error_info(exc), msg.data)
        except ServiceError as exc:
            reply = make_error(exc.info, msg.data)
        except Exception:  # a handler bug must not take the service down
            logger.exception("%s: handler for %s failed", self.name, msg.subject)
            reply = make_error(error_info("internal_error", "internal error"), msg.data)
        if reply is not None and msg.reply:
            await self._respond(msg.reply, reply)

    async def _respond(self, inbox: str, reply: Message) -> None:
        try:
            await self.nc.publish(inbox, reply.encode())
        except nats.errors.Error as exc:
            logger.warning("%s: cannot reply to %s: %s", self.name, inbox, exc)

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop taking requests, give running handlers ``grace_s`` to finish, then drain.

        Only the :meth:`serve` subscriptions stop first: what handlers still need to finish
        (worker states, reply inboxes) keeps flowing until the final drain.
        """
        for sub in self._intake:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._intake.clear()
        await self.tasks.close(grace_s)
        if not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await self.nc.drain()


def _default_error_reply(info: ErrorInfo, payload: bytes) -> Message:
    return ErrorReply(error=info)


def stop_on_signals(stop: asyncio.Event,
                    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Make ``signals`` set ``stop`` (on the running loop; main thread only)."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)


async def serve_until_stopped(start: Callable[[contextlib.AsyncExitStack], Awaitable[None]],
                              stop: asyncio.Event) -> None:
    """Run ``start(stack)``, wait for ``stop``, then unwind the stack (cleanup in reverse order).

    Once started, everything the service has allocated so far (imported libraries, the
    model, the tokenizer: hundreds of thousands of objects) is moved out of the garbage
    collector's sight with :func:`gc.freeze`. A full collection then scans only what serving
    allocates, instead of stalling the loop for a tenth of a second or more.
    """
    async with contextlib.AsyncExitStack() as stack:
        await start(stack)
        gc.freeze()
        stack.callback(gc.unfreeze)
        await stop.wait()


def run_service(start: Callable[[contextlib.AsyncExitStack], Awaitable[None]]) -> None:
    """Run one service on uvloop until SIGTERM or SIGINT, then shut it down gracefully."""
    import uvloop

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await serve_until_stopped(start, stop)

    uvloop.run(main())


def service_main(start_of: Callable[[], Callable[[contextlib.AsyncExitStack], Awaitable[None]]]) -> None:
    """``python -m services.<name>``: build the service (``start_of`` returns its ``start``) and run
    it with :func:`run_service`. A refused setting, or NATS unreachable past the connect deadline,
    ends the process with one ``error:`` line on stderr and exit status 1 instead of a traceback."""
    try:
        start = start_of()
    except ValueError as exc:  # ConfigError among them
        raise SystemExit(f"error: {exc}") from None
    try:
        run_service(start)
    except (ConnectionError, ConfigError) as exc:
        raise SystemExit(f"error: {exc}") from None
