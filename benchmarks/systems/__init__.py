"""The systems under test, by CLI name. Imports are lazy: a system that cannot be built fails alone."""

from __future__ import annotations

from benchmarks.systems.base import BenchContext, StreamEvent, System, Turn

SYSTEM_NAMES = ("sessionserve", "sessionserve-nokv", "sessionserve-local", "sessionserve-http", "hf-generate", "hf-cb")


def build_system(name: str, context: BenchContext) -> System:
    if name in ("sessionserve", "sessionserve-nokv"):
        from benchmarks.systems.sessionserve import EngineSystem

        return EngineSystem(name, context, reuse_kv=name == "sessionserve")
    if name == "sessionserve-local":
        from benchmarks.systems.sessionserve_local import LocalSystem

        return LocalSystem(name, context)
    if name == "sessionserve-http":
        from benchmarks.systems.sessionserve_http import HTTPSystem

        return HTTPSystem(name, context)
    if name == "hf-generate":
        from benchmarks.systems.hf_generate import HFGenerate

        return HFGenerate(name, context)
    if name == "hf-cb":
        from benchmarks.systems.hf_cb import HFContinuousBatching

        return HFContinuousBatching(name, context)
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEM_NAMES)}")


__all__ = ["SYSTEM_NAMES", "BenchContext", "StreamEvent", "System", "Turn", "build_system"]
