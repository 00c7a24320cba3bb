"""serving/server/direct_ingress.py without Ray: the environment it sets, the modes it tells apart, its ports."""

from __future__ import annotations

import os
import socket

import pytest
from pydantic import ValidationError

from serving.config import load_config
from serving.server import direct_ingress
from tests.cluster import free_port

# Serve's instance details while the ingress replica starts (the app's group lists the proxy) and once it runs.
PROXY = {"ip": "127.0.0.1", "port": 41235, "instance_id": "", "name": "SERVE_PROXY_ACTOR-3f2a"}
REPLICA = {"ip": "127.0.0.1", "port": 8123, "instance_id": "", "name": "SERVE_REPLICA::sessionserve#Ingress#ab12"}


def group(app: str, *targets: dict, protocol: str = "HTTP") -> dict:
    return {"protocol": protocol, "route_prefix": "/", "app_name": app, "targets": list(targets)}


def test_the_local_environment_gives_the_ingress_exactly_the_configured_port():
    env = direct_ingress.local_env("direct", 8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    low, high = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    assert list(range(low, high)) == [8123]  # Ray allocates from range(MIN, MAX)
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0" and env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"
    assert direct_ingress.mode_of(env) == "direct"


def test_with_haproxy_the_replicas_keep_rays_port_range_and_haproxy_the_configured_port():
    env = direct_ingress.local_env("haproxy", 8123)
    assert env == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    assert direct_ingress.mode_of(env) == "haproxy"
    assert direct_ingress.http_options("haproxy", "0.0.0.0", 8123) == {"host": "0.0.0.0", "port": 8123}
    assert direct_ingress.http_options("direct", "0.0.0.0", 8123) == {"host": "0.0.0.0", "port": 0}
    assert not direct_ingress.serves_directly("haproxy")  # clients reach HAProxy on serving.port, not a replica


def test_mode_of_follows_ray_haproxy_implies_direct():
    assert direct_ingress.mode_of({}) == "proxy"
    assert direct_ingress.mode_of({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}) == "proxy"
    assert direct_ingress.mode_of({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}) == "direct"
    assert direct_ingress.mode_of({"RAY_SERVE_ENABLE_HA_PROXY": "1"}) == "haproxy"


def test_auto_is_direct_on_a_ray_we_start_unless_the_environment_or_several_ingress_replicas_say_otherwise():
    def local(env: dict[str, str], ingress_replicas: int = 1) -> str:
        return direct_ingress.resolve("auto", joined=None, env=env, ingress_replicas=ingress_replicas)

    assert local({}) == "direct"
    assert local({}, ingress_replicas=2) == "proxy"  # something must spread requests over them
    assert local({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}) == "proxy"  # asked for explicitly
    assert local({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, ingress_replicas=2) == "haproxy"  # the local Ray inherits it
    assert local({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}) == "direct"


def test_auto_follows_a_joined_cluster_and_a_named_mode_is_itself():
    for cluster in ("proxy", "direct", "haproxy"):
        assert direct_ingress.resolve("auto", joined=cluster, env={}, ingress_replicas=1) == cluster
        assert direct_ingress.resolve("replica", joined=cluster, env={}, ingress_replicas=1) == "replica"
    assert direct_ingress.resolve("proxy", joined=None, env={}, ingress_replicas=1) == "proxy"


def test_serve_resolves_auto_into_a_validated_config_or_says_why_it_cannot(monkeypatch):
    from serving.cli import resolve_ingress
    from serving.config import Config

    for name in (direct_ingress.ENABLE, direct_ingress.HA_PROXY):  # what a local Ray would inherit
        monkeypatch.delenv(name, raising=False)

    settings, problem = resolve_ingress(Config(), joined=None)
    assert problem is None and settings.serving.ingress == "direct"
    assert settings == Config.model_validate({"serving": {"ingress": "direct"}})  # nothing else changed
    two = Config.model_validate({"serving": {"ingress_replicas": 2}})
    assert resolve_ingress(two, joined="haproxy")[0].serving.ingress == "haproxy"
    kept, problem = resolve_ingress(two, joined="direct")  # a direct cluster gives one replica the port
    assert kept == two and problem is not None
    assert "resolves to direct" in problem and "serving.ingress_replicas to 1" in problem, problem


def test_a_mismatch_names_the_variable_and_both_ways_out():
    assert direct_ingress.mismatch("direct", "direct", "h:6379") is None
    assert direct_ingress.mismatch("proxy", "proxy", "h:6379") is None
    wanted_direct = direct_ingress.mismatch("direct", "proxy", "h:6379")
    assert wanted_direct and "h:6379" in wanted_direct and "RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in wanted_direct
    assert "--ingress proxy" in wanted_direct
    wanted_proxy = direct_ingress.mismatch("proxy", "direct", "h:6379")
    assert wanted_proxy and "--ingress direct" in wanted_proxy
    assert direct_ingress.mismatch("replica", "direct", "h:6379") is None  # the model replica serves directly
    wanted_replica = direct_ingress.mismatch("replica", "proxy", "h:6379")
    assert wanted_replica and "serving.ingress is replica" in wanted_replica


def test_haproxy_needs_a_cluster_started_for_it_and_direct_runs_on_one():
    assert direct_ingress.mismatch("haproxy", "haproxy", "h:6379") is None
    assert direct_ingress.mismatch("direct", "haproxy", "h:6379") is None  # each replica still has its own port
    for cluster, way_out in (("proxy", "--ingress proxy"), ("direct", "--ingress direct")):
        refused = direct_ingress.mismatch("haproxy", cluster, "h:6379")
        assert refused and "RAY_SERVE_ENABLE_HA_PROXY=1" in refused and way_out in refused, refused
    wanted_proxy = direct_ingress.mismatch("proxy", "haproxy", "h:6379")
    assert wanted_proxy and "--ingress haproxy" in wanted_proxy


def test_ingress_ports_skip_the_proxy_listed_until_a_replica_runs():
    starting = {"target_groups": [group("sessionserve", PROXY)]}
    assert direct_ingress.ingress_ports(starting, "sessionserve") == []
    other = {**REPLICA, "port": 8124, "name": "SERVE_REPLICA::other#Ingress#cd34"}
    running = {"target_groups": [group("other", other), group("sessionserve", REPLICA), group("sessionserve", PROXY)]}
    assert direct_ingress.ingress_ports(running, "sessionserve") == [8123]
    grpc = {"target_groups": [group("sessionserve", REPLICA, protocol="gRPC")]}
    assert direct_ingress.ingress_ports(grpc, "sessionserve") == []
    assert direct_ingress.ingress_ports({}, "sessionserve") == []


def test_the_config_key_defaults_to_auto_and_refuses_anything_else():
    assert load_config().serving.ingress == "auto"
    assert load_config(None, {"serving": {"ingress": "proxy"}}).serving.ingress == "proxy"
    assert load_config(None, {"serving": {"ingress": "direct"}}).serving.ingress == "direct"
    assert load_config(None, {"serving": {"ingress": "haproxy"}}).serving.ingress == "haproxy"
    with pytest.raises(ValidationError, match="'auto', 'proxy', 'direct', 'replica' or 'haproxy'"):
        load_config(None, {"serving": {"ingress": "nginx"}})


def test_the_model_replica_serves_http_only_when_there_is_one_of_it():
    assert load_config(None, {"serving": {"ingress": "replica"}}).serving.replicas == 1
    with pytest.raises(ValidationError, match=r"set serving\.replicas to 1, or use ingress direct, haproxy or proxy"):
        load_config(None, {"serving": {"ingress": "replica", "replicas": 2}})


def test_several_ingress_replicas_need_something_in_front_that_spreads_requests_over_them():
    for ingress in ("haproxy", "proxy"):
        assert load_config(None, {"serving": {"ingress": ingress, "ingress_replicas": 3}}).serving.ingress_replicas == 3
    for ingress in ("direct", "replica"):  # one replica gets the configured port
        with pytest.raises(ValidationError, match=r"set serving\.ingress_replicas to 1, or use ingress haproxy"):
            load_config(None, {"serving": {"ingress": ingress, "ingress_replicas": 2}})
    with pytest.raises(ValidationError, match="ingress_replicas"):
        load_config(None, {"serving": {"ingress_replicas": 0}})


def test_prepare_local_ray_sets_the_variables_or_says_why_not(monkeypatch):
    env: dict[str, str] = {}
    monkeypatch.setattr(os, "environ", env)  # what the local Ray would inherit
    assert direct_ingress.prepare_local_ray("proxy", "127.0.0.1", 8000) is None and env == {}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = direct_ingress.prepare_local_ray("direct", "127.0.0.1", port)
        assert in_use == f"port {port} on 127.0.0.1 is already in use"
        assert env == {}
    assert direct_ingress.prepare_local_ray("direct", "127.0.0.1", port) is None
    assert env == direct_ingress.local_env("direct", port)
    refused = direct_ingress.prepare_local_ray("proxy", "127.0.0.1", port)  # the variable is now in the environment
    assert refused and "--ingress direct" in refused


def test_prepare_local_ray_for_haproxy_checks_haproxys_own_ports(monkeypatch):
    env: dict[str, str] = {}
    monkeypatch.setattr(os, "environ", env)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        stats = taken.getsockname()[1]
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(stats)
        in_use = direct_ingress.prepare_local_ray("haproxy", "127.0.0.1", free_port())
        assert in_use and f"RAY_SERVE_HAPROXY_STATS_PORT ({stats})" in in_use and "RAY_SERVE_ENABLE_HA_PROXY" not in env
    env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    assert direct_ingress.prepare_local_ray("haproxy", "127.0.0.1", free_port()) is None
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    for ingress in ("direct", "replica", "proxy"):  # a local Ray would inherit HAProxy, which takes serving.port
        refused = direct_ingress.prepare_local_ray(ingress, "127.0.0.1", free_port())
        assert refused and "--ingress haproxy" in refused, refused
