"""The JSON request bodies of the write endpoints, as the OpenAPI document declares them.

The handlers take their bodies as plain JSON (``Body()`` typed ``Any``) and validate them
themselves, so that a bad body is the API's own one-line 422, not pydantic's error list.
The schemas here are generated (``msgspec.json.schema``) from the types those handlers
validate with, so the document follows the validation instead of copying it:

* ``POST /v1/jobs``: ``coordinator.jobs.build_job`` — the request fields it accepts, typed
  by the ``JobSpec`` fields they become (``ModelSpecMsg``, ``StrategyConfig``,
  ``TrainConfig``, ``CodecConfig``, ...), ``EligibilityPolicy`` and ``SelectionConfig``;
  ``shards`` is the one field with no type of its own.
* ``POST /v1/models/{name}/rollback``: :class:`RollbackBody`.

A handler given a body that matches its schema may still answer 422 for what a schema
cannot say (a model too large for this coordinator, a sync FedAvg job whose round sizes
differ, ...).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from coordinator.jobs import JOB_FIELDS
from coordinator.policy import EligibilityPolicy, SelectionConfig, StopConfig
from schemas.messages import JobSpec

Schema = dict[str, Any]


class RollbackBody(msgspec.Struct, frozen=True, kw_only=True):
    """Pin a version: it is served as ``latest`` until the pin is removed."""

    version: Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """``node`` with every ``$ref`` into ``defs`` replaced by its target (the types here
    are not recursive), so a schema stands on its own inside an OpenAPI operation."""
    if isinstance(node, list):
        return [_inline(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _inline(v, defs) for k, v in node.items() if k != "$ref"}
    ref = node.get("$ref")
    if isinstance(ref, str):
        out = {**_inline(defs[ref.rsplit("/", 1)[-1]], defs), **out}  # siblings (default) win
    return out


def schemas_of(*types: Any) -> list[Schema]:
    """The JSON schema of each type, self-contained (no ``$ref``)."""
    schemas, defs = msgspec.json.schema_components(types)
    return [_inline(s, defs) for s in schemas]


def _shards_schema() -> Schema:
    return {"type": "integer", "minimum": 1,
            "description": "model slices, one aggregator shard each (at most the "
                           "coordinator's max_shards, at most one per parameter); "
                           "default: one per live aggregator"}  # fmt: skip


def job_request_schema() -> Schema:
    """The body of ``POST /v1/jobs``: what ``build_job`` accepts, nothing else."""
    spec, eligibility, selection, stop = schemas_of(
        JobSpec, EligibilityPolicy, SelectionConfig, StopConfig
    )
    # the policies' from_dict refuses unknown fields, as build_job does; the msgspec
    # structs (spec, strategy, ...) ignore them, as every wire message does
    own = {
        "shards": _shards_schema(),
        "eligibility": {**eligibility, "additionalProperties": False},
        "selection": {**selection, "additionalProperties": False},
        "stop": {**stop, "additionalProperties": False},
    }
    fields: Schema = spec["properties"]
    order = [n for n in fields if n in JOB_FIELDS] + sorted(JOB_FIELDS - fields.keys())
    missing = [n for n in order if n not in fields and n not in own]
    if missing:
        raise RuntimeError(f"build_job accepts {missing} but the schema has no type for them")
    props = {n: fields[n] if n in fields else own[n] for n in order}
    # a JobSpec field without a default is required, except job_id (build_job makes one)
    required = [n for n in spec["required"] if n in props and n != "job_id"]
    return {"title": "JobRequest", "type": "object", "properties": props,
            "required": required, "additionalProperties": False}  # fmt: skip


def json_body(schema: Schema, example: Any) -> dict[str, Any]:
    """``openapi_extra`` for a route whose handler reads a required JSON body itself (the
    example is shown at ``/docs`` and sent by schemathesis's examples phase)."""
    media = {"schema": schema, "example": example}
    return {"requestBody": {"required": True, "content": {"application/json": media}}}


JOB_REQUEST: Schema = job_request_schema()
JOB_EXAMPLE: dict[str, Any] = {
    "model_name": "digits",
    "spec": {"family": "mlp", "n_features": 64, "n_classes": 10, "hidden": 32},
    "shards": 2,
    "strategy": {"name": "fedasync", "alpha": 0.6, "staleness": "polynomial"},
    "train": {"lr": 0.1, "local_epochs": 1, "batch_size": 32},
    "codec": {"topk": 0.1, "quant": "int8"},
    "concurrency": 50,
    "eligibility": {"min_battery": 20, "allow_metered": False},
    "selection": {"mode": "async", "over_selection": 1.3},
}
(ROLLBACK_REQUEST,) = schemas_of(RollbackBody)
ROLLBACK_EXAMPLE: dict[str, Any] = {"version": 0}
