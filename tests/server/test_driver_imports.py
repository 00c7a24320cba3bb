"""`sessionserve serve`'s own process (the Ray driver) only names the model: it never imports torch or transformers.

Importing them costs the driver seconds before Ray starts and ~300 MiB it holds for its whole life; the replicas
load the model (and the ingress replica its tokenizer) in their own processes.
"""

from __future__ import annotations

from tests.support import imported_with

DRIVER_MODULES = (
    "serving.cli",
    "serving.model_files",
    "serving.server.builder",
    "serving.server.cluster",
    "serving.server.direct_ingress",
    "serving.server.lifecycle",
)


def test_the_serve_driver_imports_neither_torch_nor_transformers():
    assert imported_with(DRIVER_MODULES, ("torch", "transformers")) == []
