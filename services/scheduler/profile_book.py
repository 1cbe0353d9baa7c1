"""The workers' performance profiles, kept by digest: each fetched once, shared by the workers that have it.

Every worker state carries its profile status (``WorkerState.profile``: ``pending``,
``failed``, "" or a digest). When a state names a digest the book does not hold, the
scheduler asks that worker once on ``worker.<id>.profile`` and keeps the parsed
:class:`PerfModel` under the digest. A reply that is not a valid profile, names another
digest, or was made for another kernel family than the worker runs is refused with one log
line, and that digest is not asked for again; the worker stays priced by rank_aware's
fallback (see ``policies.RankAware``). A fetch that fails (no answer, not ready yet) is
retried on a later state, at most once per ``RETRY_S``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from shared.perf_model import PerfModel, ProfileError
from shared.schemas.names import PROFILE_DIGEST_PATTERN
from shared.schemas.profile import ProfileReply

logger = logging.getLogger(__name__)

RETRY_S = 2.0
Fetch = Callable[[str, str], Awaitable[ProfileReply]]  # (worker id, digest) -> the worker's reply


def is_digest(status: str) -> bool:
    """Whether a worker's profile status names a profile (rather than pending, failed or none)."""
    return re.fullmatch(PROFILE_DIGEST_PATTERN, status) is not None


class ProfileBook:
    """Profiles by digest; ``fetch`` asks a worker for its profile (the scheduler's bus request)."""

    def __init__(self, fetch: Fetch, clock: Callable[[], float]) -> None:
        self._fetch = fetch
        self._clock = clock
        self._models: dict[str, PerfModel] = {}
        self._asking: set[str] = set()
        self._refused: set[str] = set()
        self._retry_at: dict[str, float] = {}

    def model(self, status: str) -> PerfModel | None:
        """The model of a worker whose profile status is ``status`` (None: none held)."""
        return self._models.get(status)

    def wanted(self, status: str) -> bool:
        """Whether a state with this profile status should make the scheduler fetch it now."""
        return (is_digest(status) and status not in self._models and status not in self._asking
                and status not in self._refused and self._clock() >= self._retry_at.get(status, 0.0))

    async def fetch(self, worker_id: str, digest: str, backend: str) -> bool:
        """Ask ``worker_id`` for profile ``digest`` (it runs ``backend``); True when a model was added."""
        self._asking.add(digest)
        try:
            reply = await self._fetch(worker_id, digest)
        except Exception as exc:  # no responders, timeout, not ready, a bad reply: ask again later
            logger.info("profile %s of worker %s not fetched (%s); retrying later", digest, worker_id, exc)
            self._retry_at[digest] = self._clock() + RETRY_S
            return False
        finally:
            self._asking.discard(digest)
        try:
            model = self._check(reply, worker_id, digest, backend)
        except ProfileError as exc:
            logger.warning("profile %s of worker %s refused: %s", digest, worker_id, exc)
            self._refused.add(digest)
            return False
        self._models[digest] = model
        logger.info("profile %s of worker %s: %s, %s on %s (%s grid)", digest, worker_id, model.info.model,
                    model.backend, model.info.device_name, model.info.grid)
        return True

    @staticmethod
    def _check(reply: ProfileReply, worker_id: str, digest: str, backend: str) -> PerfModel:
        if reply.worker_id != worker_id or reply.digest != digest:
            raise ProfileError(f"the reply is worker {reply.worker_id}'s profile {reply.digest}")
        model = PerfModel.from_text(reply.profile, f"worker {worker_id}'s profile")
        if model.backend != backend:
            raise ProfileError(f"it was made for backend {model.backend!r}; the worker runs {backend!r}")
        return model
