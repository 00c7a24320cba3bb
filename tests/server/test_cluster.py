"""serving.server.cluster without Ray: the store decision, the node watch, and the replica resources option."""

from __future__ import annotations

import time

import pytest

from serving.config import load_config
from serving.server import cluster
from serving.server.builder import build_app
from serving.server.cluster import NodeWatch, StoreCheck, check_store


def nodes(alive: int, dead: int = 0) -> list[dict]:
    return [{"NodeID": f"a{i}", "Alive": True} for i in range(alive)] + [
        {"NodeID": f"d{i}", "Alive": False} for i in range(dead)
    ]


@pytest.mark.parametrize("store", ["sqlite:////tmp/s.db", "memory://"])
def test_a_local_store_is_refused_at_start_on_two_alive_nodes(store):
    check = check_store(nodes(2), store, starting=True)
    assert check.level == "error"
    assert "refusing to start" in check.message and "2 alive nodes" in check.message
    assert "postgresql://" in check.message and "redis://" in check.message


def test_a_node_joining_while_serving_is_a_warning_not_an_error():
    check = check_store(nodes(3), "sqlite:////tmp/s.db", starting=False)
    assert check.level == "warning" and "3 alive nodes" in check.message and "redis://" in check.message


@pytest.mark.parametrize(
    ("store", "cluster_nodes"),
    [
        ("sqlite:////tmp/s.db", nodes(1)),
        ("sqlite:////tmp/s.db", nodes(1, dead=3)),  # dead nodes do not count
        ("postgresql://u:p@db/sessions", nodes(4)),
        ("redis://cache:6379/0", nodes(4)),
    ],
)
def test_one_alive_node_or_a_network_store_is_fine(store, cluster_nodes):
    assert check_store(cluster_nodes, store, starting=True) == StoreCheck("ok")


def test_node_watch_warns_once_per_new_set_of_nodes():
    seen: list[list[dict]] = [nodes(1), nodes(2), nodes(2), nodes(3), nodes(1), nodes(2)]
    warnings: list[str] = []
    watch = NodeWatch("sqlite:////tmp/s.db", nodes=lambda: seen.pop(0), warn=warnings.append)
    levels = [watch.poll().level for _ in range(6)]
    assert levels == ["ok", "warning", "warning", "warning", "ok", "warning"]
    assert len(warnings) == 3  # 2 nodes, 3 nodes, back to 2 after a drop; not again for the repeated 2
    assert "2 alive nodes" in warnings[0] and "3 alive nodes" in warnings[1] and "2 alive nodes" in warnings[2]


def test_node_watch_polls_in_the_background_only_for_a_local_store():
    polled: list[int] = []

    def two_nodes() -> list[dict]:
        polled.append(1)
        return nodes(2)

    warnings: list[str] = []
    watch = NodeWatch("sqlite:////tmp/s.db", interval_s=0.05, nodes=two_nodes, warn=warnings.append).start()
    try:
        deadline = time.monotonic() + 5
        while not warnings and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watch.stop()
    assert len(warnings) == 1 and len(polled) >= 1
    network = NodeWatch("redis://cache:6379/0", interval_s=0.01, nodes=two_nodes).start()
    before = len(polled)
    time.sleep(0.1)
    network.stop()
    assert len(polled) == before


def test_connect_joins_the_given_address_or_ray_address_else_starts_local(monkeypatch):
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.connect(None) is True and calls[-1]["address"] == "local"
    assert cluster.connect("10.0.0.1:6379") is False and calls[-1]["address"] == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert cluster.connect(None) is False and calls[-1]["address"] == "10.0.0.2:6379"


def test_replica_resources_reach_the_model_deployments_actor_options():
    config = load_config(None, {"serving": {"replicas": 2, "replica_resources": {"sessionserve_model": 1}}})
    model = build_app(config)._bound_deployment.init_args[0]
    assert model._bound_deployment.ray_actor_options["resources"] == {"sessionserve_model": 1.0}
    assert load_config(None).serving.replica_resources == {}


def test_build_app_refuses_a_memory_store_the_ingress_could_not_share():
    with pytest.raises(ValueError, match=r"memory://.*sqlite:///PATH"):
        build_app(load_config(None, {"sessions": {"store": "memory://"}}))
