"""benchmarks.ring_sim: its ring is the router's ring, and its moved fractions are what a recount finds."""

from __future__ import annotations

import json
import random

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter, _hash_bytes

from benchmarks.ring_sim import Ring, main, replica_ids, session_hashes, simulate


def real_router(replicas: list[str], vnodes: int) -> ConsistentHashRouter:
    """Ray's router with only its ring state set up (no controller, no event loop): its own rebuild and lookup."""
    router = ConsistentHashRouter.__new__(ConsistentHashRouter)
    router._deployment_id = DeploymentID(name="SessionModel", app_name="ring-test")
    router._num_virtual_nodes, router._num_fallback_replicas = vnodes, 0
    router._rebuild_ring(frozenset(ReplicaID(r, deployment_id=router._deployment_id) for r in replicas))
    return router


def test_ring_and_lookup_equal_the_routers():
    rng = random.Random(7)
    replicas = replica_ids(10, rng)
    ring, router = Ring.build(replicas, 30), real_router(replicas, 30)
    assert ring.hashes == router._ring_hashes
    assert ring.owners == [replica.unique_id for replica in router._ring_replicas]
    keys = [f"session-{i}" for i in range(2000)]
    assert [ring.owner(_hash_bytes(k.encode())) for k in keys] == [
        router._lookup_ranked_replicas(k)[0].unique_id for k in keys
    ]


def test_moved_fractions_equal_a_brute_force_recount():
    replicas, sessions, vnodes, seed = 10, 3000, 50, 3
    stats = simulate(replicas, sessions, vnodes, seed)
    # Recount with the router itself, regenerating the same ids from the same seed.
    rng = random.Random(seed)
    ids = replica_ids(replicas + 1, rng)
    keys = session_hashes(sessions, rng)
    lost_replica = ids[0]

    def owners(replica_set: list[str]) -> list[str]:
        ring = Ring.build(replica_set, vnodes)
        return [ring.owner(h) for h in keys]

    before, after_loss, after_add = owners(ids[:replicas]), owners(ids[1:replicas]), owners(ids)
    on_lost = sum(owner == lost_replica for owner in before)
    # Consistent hashing: exactly the lost replica's sessions move, and only to the newcomer when one is added.
    assert stats.moved_on_loss == round(on_lost / sessions, 5)
    assert all(a == b for a, b in zip(before, after_loss, strict=True) if a != lost_replica)
    moved_to_new = sum(a != b for a, b in zip(before, after_add, strict=True))
    assert moved_to_new == sum(b == ids[replicas] for b in after_add)
    assert stats.moved_on_add == round(moved_to_new / sessions, 5)
    # Sensible bounds around 1/N for a 10-replica ring with 50 vnodes each.
    assert 0.03 < stats.moved_on_loss < 0.25 and 0.03 < stats.moved_on_add < 0.25
    assert 1.0 < stats.max_over_mean < 2.0


def test_cli_writes_json_and_picks_the_smallest_vnode_count_meeting_the_targets(tmp_path, capsys):
    out = tmp_path / "ring.json"
    sweeps = main(["--replicas", "20", "--sessions", "4000", "--vnodes", "1,400", "--seeds", "2", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert [row["vnodes"] for row in payload["results"]] == [1, 400]
    assert [row["meets"] for row in payload["results"]] == [s.meets_targets() for s in sweeps] == [False, True]
    assert payload["chosen_vnodes"] == 400
    assert "smallest vnode count meeting the targets on every seed: 400" in capsys.readouterr().out
