"""Clients for the contract suite: the same tests run in-process and over HTTP on a real Ray Serve app."""

from __future__ import annotations

import pytest


@pytest.fixture(
    params=[
        pytest.param("local", marks=pytest.mark.model),
        pytest.param("http", marks=[pytest.mark.model, pytest.mark.ray]),
    ]
)
def client(request):
    """Each contract test runs once per client. The marks are on the params: tests/conftest.py marks tests by the
    fixtures they name, and getfixturevalue hides these two from it."""
    return request.getfixturevalue(f"{request.param}_client")
