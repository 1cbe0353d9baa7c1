"""Where `caraserve up --metrics-port P` serves each service's Prometheus ``/metrics``."""

from __future__ import annotations

GATEWAY = "gateway"


def metrics_ports(base: int, workers: int) -> dict[str, int]:
    """Service name -> its /metrics port: the gateway's on ``base``, ``worker-i``'s on ``base + 1 + i``;
    none when ``base`` is 0 (off)."""
    if base == 0:
        return {}
    return {GATEWAY: base, **{f"worker-{i}": base + 1 + i for i in range(workers)}}


def metrics_listing(ports: dict[str, int], host: str = "127.0.0.1") -> str:
    """The start-up printout's lines for ``ports`` (empty when metrics are off)."""
    return "".join(f"  metrics ({name}):{' ' * max(1, 15 - len(name))}http://{host}:{port}/metrics\n"
                   for name, port in ports.items())
