"""The bare-transport floor of the control plane: what five NATS messages cost with no service logic.

A 1-token request crosses NATS five times (client -> gateway -> scheduler -> worker ->
gateway -> client). Here four minimal relay processes pass a msgpack payload of a similar
size, with a W3C ``traceparent`` header, along the same five hops through one nats-server,
and a client times the round trips one at a time. The control-plane benchmark measures it in
the same run as the real stack and reports the ratio, because the speed of this shared host
drifts between runs.

    python -m bench.control_plane.nats_floor [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import msgpack
import nats
import uvloop

from shared.nats_server import NatsServer

RELAYS = 4  # five messages: client -> 4 relays -> client
HEADERS = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
PROMPT_IDS = list(range(100, 124))  # a short tokenized prompt, as the bench's requests carry


def _subject(hop: int) -> str:
    return f"bench.floor.hop.{hop}"


async def relay(url: str, hop: int) -> None:
    """Forward every message to the next hop (the last hop answers the client's inbox)."""
    nc = await nats.connect(url, name=f"floor-relay-{hop}")

    async def forward(msg) -> None:
        body = msgpack.unpackb(msg.data)
        target = _subject(hop + 1) if hop + 1 < RELAYS else body["inbox"]
        await nc.publish(target, msgpack.packb(body), headers=HEADERS)

    await nc.subscribe(_subject(hop), cb=forward)
    await nc.flush()
    await asyncio.Event().wait()


async def _round_trips(url: str, requests: int, warmup: int) -> list[float]:
    nc = await nats.connect(url, name="floor-client")
    inbox, arrived = nc.new_inbox(), asyncio.Queue()

    async def on_reply(msg) -> None:
        arrived.put_nowait(time.perf_counter_ns())

    await nc.subscribe(inbox, cb=on_reply)
    await nc.flush()
    ms: list[float] = []
    try:
        for i in range(warmup + requests):
            body = {"inbox": inbox, "request_id": f"floor-{i}", "prompt_token_ids": PROMPT_IDS}
            sent = time.perf_counter_ns()
            await nc.publish(_subject(0), msgpack.packb(body), headers=HEADERS)
            got = await asyncio.wait_for(arrived.get(), 10)
            if i >= warmup:
                ms.append((got - sent) / 1e6)
    finally:
        await nc.close()
    return ms


def _wait_for_relays(url: str, deadline_s: float = 30.0) -> None:
    """Block until every relay answers (each subscribes after it starts)."""
    async def probe() -> None:
        nc = await nats.connect(url, name="floor-probe")
        try:
            end = time.monotonic() + deadline_s
            while time.monotonic() < end:
                inbox = nc.new_inbox()
                sub = await nc.subscribe(inbox)
                await nc.publish(_subject(0), msgpack.packb({"inbox": inbox}), headers=HEADERS)
                try:
                    await sub.next_msg(timeout=0.5)
                    return
                except nats.errors.TimeoutError:
                    await sub.unsubscribe()
            raise RuntimeError("the floor relays did not come up")
        finally:
            await nc.close()
    uvloop.run(probe())


def measure_floor(requests: int = 400, warmup: int = 50) -> list[float]:
    """Round-trip times (ms) of ``requests`` sequential five-message round trips."""
    with NatsServer() as server:
        relays = [subprocess.Popen([sys.executable, "-m", "bench.control_plane.nats_floor", "--relay", str(hop),
                                    "--url", server.url])
                  for hop in range(RELAYS)]
        try:
            _wait_for_relays(server.url)
            return uvloop.run(_round_trips(server.url, requests, warmup))
        finally:
            for proc in relays:
                proc.terminate()
            for proc in relays:
                proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--relay", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.relay >= 0:
        uvloop.run(relay(args.url, args.relay))
        return 0
    if args.requests < 1:
        parser.error("--requests must be positive")
    ms = sorted(measure_floor(args.requests))
    print(json.dumps({"messages": RELAYS + 1, "p50_ms": round(ms[len(ms) // 2], 3),
                      "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
