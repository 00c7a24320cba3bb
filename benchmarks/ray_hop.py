"""Ray Serve's floor for the hop a turn takes between two deployments, on this machine, with nothing else running.

With `serving.ingress: direct` (or `proxy`, `haproxy`) a turn goes from the ingress replica to a model replica and
its stream comes back: two Ray hops that `serving.ingress: replica` does not take. This deploys two bare deployments
(no model, no store, no HTTP) and times, from inside the first, what those hops cost when they carry nothing:
a unary call's round trip, and a streamed call until its second item (what the ingress waits for before it answers:
the replica's name, then the first event), over gRPC (`_by_reference=False`, as the ingress calls the model) and
through Ray's actor calls. Run it on an idle machine; it starts and stops its own Ray, as `serve` does.

    .venv/bin/python -m benchmarks.ray_hop --calls 300 --out ray-hop.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle

TRANSPORTS = ("grpc", "actor calls")


@serve.deployment
class Far:
    async def unary(self, value: int) -> int:
        return value

    async def stream(self, value: int) -> AsyncIterator[int | str]:
        yield "replica name"
        yield value
        yield value


@serve.deployment
class Near:
    def __init__(self, far: DeploymentHandle) -> None:
        self.handles = dict(zip(TRANSPORTS, (far.options(_by_reference=False), far), strict=True))

    async def time_calls(self, transport: str, calls: int) -> dict[str, float]:
        """p50 ms of `calls` unary round trips and of as many streams to their second item, alternated."""
        handle = self.handles[transport]
        unary, stream = [], []
        for _ in range(calls):
            start = time.perf_counter()
            await handle.unary.remote(1)
            unary.append(time.perf_counter() - start)
            start = time.perf_counter()
            events = handle.options(stream=True).stream.remote(1)
            await events.__anext__()
            await events.__anext__()
            stream.append(time.perf_counter() - start)
            async for _ in events:
                pass
        return {
            "unary_p50_ms": 1000 * statistics.median(unary),
            "stream_second_item_p50_ms": 1000 * statistics.median(stream),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="timed calls of each kind per transport")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import ray

    from serving.server import cluster

    cluster.start_local(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        near = serve.run(Near.bind(Far.bind()), name="ray-hop", route_prefix=None)
        for transport in TRANSPORTS:  # warm both paths: connections, routers
            near.time_calls.remote(transport, 20).result()
        results = {transport: near.time_calls.remote(transport, args.calls).result() for transport in TRANSPORTS}
    finally:
        serve.shutdown()
        ray.shutdown()
    document = {"config": {"calls": args.calls}, "results": results}
    print(json.dumps(document, indent=2))
    if args.out:
        args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
