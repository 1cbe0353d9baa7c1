"""Configuration of the gateway service."""

from __future__ import annotations

from dataclasses import dataclass

from shared.bus import DEFAULT_NATS_URL
from shared.config import option, require
from shared.subjects import GATEWAY_QUEUE

DEFAULT_HTTP_PORT = 8000


@dataclass
class GatewayConfig:
    """The public edge: HTTP and NATS APIs, auth, validation, streaming relay and retries."""

    nats_url: str = option(DEFAULT_NATS_URL, "NATS server URL, or a comma-separated list of cluster nodes")
    nats_creds: str = option("", "NATS credentials file (JSON user, password, inbox_prefix; mode 0600); "
                                 "empty: CARASERVE_NATS_USER/PASSWORD, else anonymous")
    name: str = option("gateway", "this replica's NATS client name")
    queue_group: str = option(GATEWAY_QUEUE, "NATS queue group shared by gateway replicas")
    http_host: str = option("127.0.0.1", "HTTP listen address")
    http_port: int = option(DEFAULT_HTTP_PORT, "HTTP port; 0 picks a free one; -1 disables HTTP")
    metrics_port: int = option(0, "serve Prometheus text on http://METRICS_HOST:PORT/metrics; 0 = off")
    metrics_host: str = option("127.0.0.1", "the /metrics listen address")
    model_dir: str = option("default", "base model directory (tokenizer and config); 'default' = SmolLM2")
    model_name: str = option("", "name the base model is served under; empty = the directory's name")
    adapter_dir: str = option("", "the workers' adapter root: paths of runtime-loaded adapters must lie inside it "
                                  "(the catalog itself comes from the workers' states)")
    max_model_len: int = option(0, "context limit in tokens; 0 = the model's max_position_embeddings")
    default_max_tokens: int = option(16, "max_tokens of a completion request that sets none (OpenAI: 16)")
    max_inflight: int = option(256, "requests in flight at once; past it, 429 overloaded")
    api_keys: tuple[str, ...] = option((), "KEY:TENANT pairs; none = open mode (no auth)")
    tenant_adapters: tuple[str, ...] = option((), "TENANT:ADAPTER pairs (ADAPTER may be *); base model always allowed")
    admin_tenants: tuple[str, ...] = option(("admin",), "tenants that may load, re-register and unload any "
                                            "adapter (others: only their own); open mode: everyone")
    route_deadline_ms: int = option(2000, "how long the scheduler may look for capacity")
    route_timeout_s: float = option(3.0, "how long to wait for the scheduler's answer")
    stall_timeout_s: float = option(600.0, "last resort: a request with no chunk for this long is re-routed, even "
                                           "though its worker still heartbeats and lists it (queues and long "
                                           "prefills are not losses; liveness is the heartbeat)")
    worker_timeout_s: float = option(1.0, "a worker whose state is this old is presumed lost")
    missing_grace_s: float = option(1.0, "a request its worker's states stopped listing is lost after this long "
                                         "without its final chunk")
    max_reroutes: int = option(2, "re-routes after worker losses before a terminal worker_lost error")
    retry_budget_s: float = option(3.0, "after noticing a worker loss, give up with an error within this many s")
    grace_s: float = option(5.0, "on shutdown, how long in-flight requests may finish")
    journal_dir: str = option("", "where the journal of requests in flight lives (<host>-<name>.journal): a "
                                  "gateway restarted on the same host ends the streams its predecessor left "
                                  "(final gateway_restarted chunk, cancel on the worker); empty: in memory")

    def __post_init__(self) -> None:
        require(bool(self.nats_url), "nats_url must not be empty")
        require(-1 <= self.http_port <= 65535, "http_port must be -1, 0 or a port number")
        require(0 <= self.metrics_port <= 65535, "metrics_port must be 0 (off) or a port number")
        require(self.max_model_len >= 0, "max_model_len must be >= 0")
        require(self.default_max_tokens >= 1, "default_max_tokens must be >= 1")
        require(self.max_inflight >= 1, "max_inflight must be >= 1")
        for pair in self.api_keys + self.tenant_adapters:
            require(pair.count(":") >= 1 and all(pair.split(":", 1)), f"expected NAME:VALUE, got {pair!r}")
        require(all(self.admin_tenants), "admin_tenants must not contain an empty name")
        require(1 <= self.route_deadline_ms <= 600_000, "route_deadline_ms must be in [1, 600000]")
        require(self.route_timeout_s > self.route_deadline_ms / 1000.0,
                "route_timeout_s must exceed the route deadline")
        require(self.stall_timeout_s > 0, "stall_timeout_s must be > 0")
        require(self.worker_timeout_s > 0, "worker_timeout_s must be > 0")
        require(self.missing_grace_s > 0, "missing_grace_s must be > 0")
        require(self.max_reroutes >= 0, "max_reroutes must be >= 0")
        require(self.retry_budget_s > 0, "retry_budget_s must be > 0")
        require(self.grace_s >= 0, "grace_s must be >= 0")
