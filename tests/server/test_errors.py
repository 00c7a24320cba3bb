"""Errors a model replica's death raises in the ingress become a 503 the client can retry, not a bare 500."""

from __future__ import annotations

import pytest
from ray import exceptions as ray_errors

from serving.server.errors import error_headers, to_api_error


@pytest.mark.parametrize(
    "error",
    [ray_errors.ActorDiedError(), ray_errors.ActorUnavailableError("the replica's node is unreachable", None)],
)
def test_a_lost_replica_is_503_replica_unavailable_with_retry_after(error):
    api_error = to_api_error(error)
    assert (api_error.status, api_error.code) == (503, "replica_unavailable")
    assert type(error).__name__ in api_error.message and "retry" in api_error.message
    assert error_headers(api_error) == {"retry-after": "5"}


def test_an_error_only_named_like_rays_is_an_internal_error():
    RayActorError = type("RayActorError", (Exception,), {})  # the name alone, from another module

    api_error = to_api_error(RayActorError())
    assert (api_error.status, api_error.code) == (500, "internal_error")
