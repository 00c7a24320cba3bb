"""Clients for the contract suite: the same tests run in-process and over HTTP on a real Ray Serve app."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["local", "http"])
def client(request):
    """Each contract test runs once per client."""
    return request.getfixturevalue(f"{request.param}_client")
