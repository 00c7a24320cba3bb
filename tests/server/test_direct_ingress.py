"""serving/server/direct_ingress.py without Ray: the environment it sets, the modes it tells apart, its ports."""

from __future__ import annotations

import os
import socket

import pytest
from pydantic import ValidationError

from serving.config import load_config
from serving.server import direct_ingress

# Serve's instance details while the ingress replica starts (the app's group lists the proxy) and once it runs.
PROXY = {"ip": "127.0.0.1", "port": 41235, "instance_id": "", "name": "SERVE_PROXY_ACTOR-3f2a"}
REPLICA = {"ip": "127.0.0.1", "port": 8123, "instance_id": "", "name": "SERVE_REPLICA::sessionserve#Ingress#ab12"}


def group(app: str, *targets: dict, protocol: str = "HTTP") -> dict:
    return {"protocol": protocol, "route_prefix": "/", "app_name": app, "targets": list(targets)}


def test_the_local_environment_gives_the_ingress_exactly_the_configured_port():
    env = direct_ingress.local_env(8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    low, high = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    assert list(range(low, high)) == [8123]  # Ray allocates from range(MIN, MAX)
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0" and env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"
    assert direct_ingress.mode_of(env) == "direct"


def test_mode_of_follows_ray_haproxy_implies_direct():
    assert direct_ingress.mode_of({}) == "proxy"
    assert direct_ingress.mode_of({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}) == "proxy"
    assert direct_ingress.mode_of({"RAY_SERVE_ENABLE_HA_PROXY": "1"}) == "direct"


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


def test_ingress_ports_skip_the_proxy_listed_until_a_replica_runs():
    starting = {"target_groups": [group("sessionserve", PROXY)]}
    assert direct_ingress.ingress_ports(starting, "sessionserve") == []
    other = {**REPLICA, "port": 8124, "name": "SERVE_REPLICA::other#Ingress#cd34"}
    running = {"target_groups": [group("other", other), group("sessionserve", REPLICA), group("sessionserve", PROXY)]}
    assert direct_ingress.ingress_ports(running, "sessionserve") == [8123]
    grpc = {"target_groups": [group("sessionserve", REPLICA, protocol="gRPC")]}
    assert direct_ingress.ingress_ports(grpc, "sessionserve") == []
    assert direct_ingress.ingress_ports({}, "sessionserve") == []


def test_the_config_key_defaults_to_proxy_and_refuses_anything_else():
    assert load_config().serving.ingress == "proxy"
    assert load_config(None, {"serving": {"ingress": "direct"}}).serving.ingress == "direct"
    with pytest.raises(ValidationError, match="'proxy', 'direct' or 'replica'"):
        load_config(None, {"serving": {"ingress": "haproxy"}})


def test_the_model_replica_serves_http_only_when_there_is_one_of_it():
    assert load_config(None, {"serving": {"ingress": "replica"}}).serving.replicas == 1
    with pytest.raises(ValidationError, match=r"set serving\.replicas to 1, or use ingress direct or proxy"):
        load_config(None, {"serving": {"ingress": "replica", "replicas": 2}})


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
    assert env == direct_ingress.local_env(port)
    refused = direct_ingress.prepare_local_ray("proxy", "127.0.0.1", port)  # the variable is now in the environment
    assert refused and "--ingress direct" in refused
