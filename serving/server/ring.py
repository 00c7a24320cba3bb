"""The session ring: which model replica Ray Serve routes a session to, as seen from inside a replica.

The ingress routes turns with Ray Serve's ConsistentHashRouter. A replica that wants to know which sessions it
inherited after a replica loss must compute the same owner, so `SessionRing` runs the router's own ring code (its
`_rebuild_ring` and `_lookup_ranked_replicas`, on an instance without the routing machinery) over the replicas the
Serve controller reports running: the same hash, seed, virtual-node keys and kwargs, never a second hash.
"""

from __future__ import annotations

from collections.abc import Iterable

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import RequestRouterConfig
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

ROUTER_KWARGS = {"num_virtual_nodes": 400, "num_fallback_replicas": 0}

# Consistent hashing over the session id: every turn of a session reaches the replica holding its KV, and
# when a replica dies the ring moves only that replica's sessions (they rebuild KV from the shared history).
# 400 virtual nodes per replica: with the router's default 100, the busiest of 100 replicas holds up to 1.41x the
# mean number of sessions; with 400, at most 1.19x (`python -m benchmarks.ring_sim`, 10 rings of 100k sessions).
SESSION_AFFINITY = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    request_router_kwargs=ROUTER_KWARGS,
)


class SessionRing:
    """The router's ring over a set of replica ids (`ReplicaID.unique_id`, what `x-sessionserve-replica` names)."""

    def __init__(self, replicas: Iterable[str], deployment: DeploymentID) -> None:
        router = ConsistentHashRouter.__new__(ConsistentHashRouter)  # the ring code only, no routing loop
        router._deployment_id = deployment
        router.initialize_state(**ROUTER_KWARGS)
        router._rebuild_ring(frozenset(ReplicaID(unique_id, deployment) for unique_id in replicas))
        self._router = router

    def owner(self, session_id: str) -> str | None:
        """The replica this session's turns go to; None on an empty ring."""
        ranked = self._router._lookup_ranked_replicas(session_id)
        return ranked[0].unique_id if ranked else None


def running_replicas(deployment: DeploymentID) -> frozenset[str]:
    """The deployment's replicas the controller reports RUNNING: those the routers' rings are built from."""
    from ray.serve.context import _get_global_client  # Serve has no public call listing replica ids (2.60)

    client = _get_global_client()  # raises RayServeException when no controller runs, so never None here
    assert client is not None
    details = client.get_serve_details()
    app = details.get("applications", {}).get(deployment.app_name, {})
    replicas = app.get("deployments", {}).get(deployment.name, {}).get("replicas", [])
    return frozenset(r["replica_id"] for r in replicas if r.get("state") == "RUNNING")
