"""Configuration of the scheduler service."""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.policies import POLICY_NAMES
from shared.bus import DEFAULT_NATS_URL
from shared.config import check_choice, option, require
from shared.subjects import SCHEDULER_QUEUE


@dataclass
class SchedulerConfig:
    """How the scheduler tracks workers and routes requests."""

    nats_url: str = option(DEFAULT_NATS_URL, "NATS server URL, or a comma-separated list of cluster nodes")
    nats_creds: str = option("", "NATS credentials file (JSON user, password, inbox_prefix; mode 0600); "
                                 "empty: CARASERVE_NATS_USER/PASSWORD, else anonymous")
    name: str = option("scheduler", "this replica's NATS client name")
    policy: str = option("rank_aware", "routing policy (its knobs are in PolicyConfig)", POLICY_NAMES)
    profile: str = option("", "reference performance profile JSON: rank_aware prices each worker with the "
                              "profile it publishes, and a worker whose profile is pending with this one")
    queue_group: str = option(SCHEDULER_QUEUE, "NATS queue group shared by scheduler replicas")
    heartbeat_interval_s: float = option(0.1, "how often workers publish their state")
    missed_heartbeats: int = option(10, "missed states after which a worker is dead")
    submit_timeout_s: float = option(1.0, "how long a worker may take to acknowledge a submit")
    pending_ttl_s: float = option(5.0, "longest a routed request counts as pending on a worker")
    grace_s: float = option(5.0, "on shutdown, how long in-flight routes may finish")
    decision_log: str = option("", "write every routing decision (policy inputs and choice) to this JSON-lines "
                                   "file, truncated at start ({name}: the replica's name); empty: off")

    def __post_init__(self) -> None:
        require(bool(self.nats_url), "nats_url must not be empty")
        require(bool(self.name), "name must not be empty")
        check_choice("policy", self.policy, POLICY_NAMES)
        require(bool(self.queue_group), "queue_group must not be empty")
        require(self.heartbeat_interval_s > 0, "heartbeat_interval_s must be > 0")
        require(self.missed_heartbeats >= 1, "missed_heartbeats must be >= 1")
        require(self.submit_timeout_s > 0, "submit_timeout_s must be > 0")
        require(self.pending_ttl_s > 0, "pending_ttl_s must be > 0")
        require(self.grace_s >= 0, "grace_s must be >= 0")

    @property
    def dead_after_s(self) -> float:
        """A worker whose last state is older than this is dead."""
        return self.heartbeat_interval_s * self.missed_heartbeats
