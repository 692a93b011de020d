"""Unknown keys in a Ray Serve config are errors, not silently ignored.

Ray's ``ServeDeploySchema`` (pydantic) ignores keys it does not know, so ``max_ongoing_request: 4`` in a
deployment deploys with the default and nobody is told. Its JSON schema made strict — every model gets
``additionalProperties: false`` — and checked with ``jsonschema`` names the misspelled key and where it is.
Free-form fields (``args``, ``runtime_env``, ``user_config``…) stay open; the app's own ``args`` are checked by
``ServeSettings`` (strict pydantic) instead.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any


def strict_pydantic_schema(node: Any) -> Any:
    """A pydantic model's JSON schema in which unknown keys are errors: every model (an object schema with
    ``properties``) gets ``additionalProperties: false``, and where a field accepts "a dict or the model"
    (``anyOf: [free-form object, $ref model, ...]``) the free-form branch is dropped (the dict is only the
    untyped spelling of the same model). Free-form dicts stay open."""
    if isinstance(node, list):
        return [strict_pydantic_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_pydantic_schema(v) for k, v in node.items()}
    if "properties" in out:
        out["additionalProperties"] = False
    for key in ("anyOf", "oneOf"):
        branches = out.get(key)
        if isinstance(branches, list) and any("$ref" in b or "properties" in b for b in branches):
            out[key] = [b for b in branches if not (b.get("type") == "object" and "properties" not in b)]
    return out


@lru_cache(maxsize=1)
def serve_config_validator():
    import jsonschema
    from ray.serve.schema import ServeDeploySchema

    return jsonschema.Draft202012Validator(strict_pydantic_schema(ServeDeploySchema.model_json_schema()))


def serve_config_problems(config: dict) -> list[str]:
    """One line per problem (``$.path: message``), sorted by path; for ``anyOf`` the branches' own complaints
    other than "not of type X" (e.g. a misspelled key inside the branch that has the right type)."""
    lines = []
    for e in sorted(serve_config_validator().iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        inner = [c for c in e.context if c.validator != "type"] or [e]
        lines.extend(f"{c.json_path}: {c.message[:300]}" for c in inner)
    return lines
