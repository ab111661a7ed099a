"""Kubernetes' OpenAPI (swagger 2) spec → kubeconform's JSON-schema layout, offline.

kubeconform normally downloads its schemas at run time; here they are made from the
``api/openapi-spec/swagger.json`` of the ``k8s.io/kubernetes`` Go module (fetched through
the Go module proxy by scripts/k8s_tools.sh), the same source and the same rules as the
``openapi2jsonschema`` conversion behind kubeconform's published schemas:

* one file per kind, ``<out>/<version>-standalone-strict/<kind>-<group>-<v>.json``
  (``deployment-apps-v1.json``, ``service-v1.json``, ``networkpolicy-networking-v1.json``):
  kubeconform's ``{{ .ResourceKind }}{{ .KindSuffix }}``, the group cut at its first dot;
* standalone: each file carries the definitions its kind reaches under ``definitions``,
  referenced as ``#/definitions/...`` (so recursive types need no inlining);
* strict: every object with ``properties`` gets ``additionalProperties: false`` (an
  unknown or misspelt field fails);
* ``IntOrString`` accepts a string or an integer, ``Quantity`` a string or a number.

Usage: ``python3 k8s_schemas.py SWAGGER_JSON OUT_DIR VERSION`` (stdlib only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

JSON = dict[str, Any]
INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
REF = "#/definitions/"


def _strict(node: Any) -> Any:
    """A copy of ``node`` with ``additionalProperties: false`` on every object that lists
    its ``properties`` and says nothing about others."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _refs(node: Any) -> set[str]:
    if isinstance(node, list):
        return set().union(*(_refs(n) for n in node)) if node else set()
    if not isinstance(node, dict):
        return set()
    found = {node["$ref"].removeprefix(REF)} if isinstance(node.get("$ref"), str) else set()
    for v in node.values():
        found |= _refs(v)
    return found


def _closure(name: str, defs: JSON) -> list[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = todo.pop()
        if n in seen or n not in defs:
            continue
        seen.add(n)
        todo.extend(_refs(defs[n]))
    return sorted(seen)


def definitions(spec: JSON) -> JSON:
    """The spec's definitions, strict, with the two special scalars widened."""
    defs: JSON = {k: _strict(v) for k, v in spec["definitions"].items()}
    if INT_OR_STRING in defs:
        defs[INT_OR_STRING] = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    if QUANTITY in defs:
        defs[QUANTITY] = {"oneOf": [{"type": "string"}, {"type": "number"}]}
    return defs


def file_name(kind: str, group: str, version: str) -> str:
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix.lower()}.json"


def convert(spec: JSON) -> dict[str, JSON]:
    """File name → standalone strict schema, one per kind (group, version)."""
    defs = definitions(spec)
    out: dict[str, JSON] = {}
    for name, raw in spec["definitions"].items():
        for gvk in raw.get("x-kubernetes-group-version-kind", []):
            schema = dict(defs[name])
            schema["$schema"] = "http://json-schema.org/draft-04/schema#"
            schema["definitions"] = {n: defs[n] for n in _closure(name, defs)}
            fname = file_name(gvk["kind"], gvk.get("group", ""), gvk["version"])
            # a kind listed under several definitions (e.g. DeleteOptions): keep the first
            out.setdefault(fname, schema)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    swagger, out_dir, version = Path(argv[0]), Path(argv[1]), argv[2]
    spec = json.loads(swagger.read_text())
    target = out_dir / f"{version}-standalone-strict"
    target.mkdir(parents=True, exist_ok=True)
    files = convert(spec)
    for fname, schema in files.items():
        (target / fname).write_text(json.dumps(schema, separators=(",", ":")))
    print(f"{len(files)} schemas in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
