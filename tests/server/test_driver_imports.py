"""`sessionserve serve`'s own process (the Ray driver) only names the model: it never imports torch or transformers.

Importing them costs the driver seconds before Ray starts and ~300 MiB it holds for its whole life; the replicas
load the model (and the ingress replica its tokenizer) in their own processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DRIVER_MODULES = (
    "serving.cli",
    "serving.model_files",
    "serving.server.builder",
    "serving.server.cluster",
    "serving.server.direct_ingress",
    "serving.server.lifecycle",
)


def test_the_serve_driver_imports_neither_torch_nor_transformers():
    script = (
        "import importlib, json, sys\n"
        f"for name in {DRIVER_MODULES!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(result.stdout) == []
