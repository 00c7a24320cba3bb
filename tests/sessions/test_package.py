"""The sessions package stays pure Python: nothing heavy and nothing from serving/ gets imported."""

from __future__ import annotations

from tests.paths import REPO
from tests.support import imported_with

FORBIDDEN = ("torch", "ray", "fastapi", "transformers", "pydantic", "serving")


def test_sessions_imports_nothing_heavy():
    modules = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "sessions").rglob("*.py")
    )
    assert "sessions.manager" in modules and "sessions.store.sqlite" in modules
    assert imported_with(modules, FORBIDDEN) == []
