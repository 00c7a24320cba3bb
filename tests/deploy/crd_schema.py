"""A Kubernetes CRD's OpenAPI v3 schema as a JSON Schema that `jsonschema` can check a manifest against.

What the API server does that plain JSON Schema does not, and how it is mapped here:
- `x-kubernetes-int-or-string: true`: an integer or a string (quantities, ports by name);
- `nullable: true`: null is allowed too;
- objects with `properties` and no `additionalProperties`: the API server prunes unknown fields, and kubectl's
  default strict field validation rejects them; here they are errors (`additionalProperties: false`), unless the
  node says `x-kubernetes-preserve-unknown-fields`;
- `format: int32` / `int64`: range-checked.
Not checked: CEL rules (`x-kubernetes-validations`) and list-map key uniqueness (`x-kubernetes-list-map-keys`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def crd_version_schema(crd_path: Path, version: str) -> dict[str, Any]:
    """The openAPIV3Schema of one served version of the CRD file."""
    crd = yaml.load(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: C if present
    assert crd["kind"] == "CustomResourceDefinition", crd_path
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return dict(entry["schema"]["openAPIV3Schema"])
    raise KeyError(f"{crd_path} has no version {version}")


def to_json_schema(node: Any) -> Any:
    """Rewrite the OpenAPI/Kubernetes extensions above into plain JSON Schema, recursively."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_json_schema(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    strict = "properties" in node and "additionalProperties" not in node
    if strict and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _int_format(name: str) -> Any:
    low, high = INT_RANGES[name]
    return lambda value: not isinstance(value, int) or isinstance(value, bool) or low <= value <= high


def validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    checker = jsonschema.FormatChecker()
    for name in INT_RANGES:
        checker.checks(name)(_int_format(name))
    converted = to_json_schema(schema)
    # OpenAPI v3.0 schemas are closest to draft 4 (no `const`, boolean exclusiveMinimum), which Draft4Validator reads.
    jsonschema.Draft4Validator.check_schema(converted)
    return jsonschema.Draft4Validator(converted, format_checker=checker)


def errors(check: jsonschema.protocols.Validator, document: dict[str, Any]) -> list[str]:
    """Every violation, as `path: message`; empty when the document is valid."""
    found = check.iter_errors(document)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found)
