"""Validate documents against the OCI JSON schemas that Debian ships, offline.

    validate(document, "manifest")   # or index, config, descriptor, layout, runtime-config

The schemas come from golang-github-opencontainers-image-spec-dev and
golang-github-opencontainers-specs-dev. Their `$ref`s point at sibling files ("defs.json#/…")
and their nested `id`s would send a resolver to https://opencontainers.org, so each schema is
loaded once with every `$ref` replaced by the (local) schema it names: no network, and it works
with any python3-jsonschema.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

IMAGE_SPEC = Path("/usr/share/gocode/src/github.com/opencontainers/image-spec/schema")
RUNTIME_SPEC = Path("/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema")
SCHEMAS = {
    "manifest": IMAGE_SPEC / "image-manifest-schema.json",
    "index": IMAGE_SPEC / "image-index-schema.json",
    "config": IMAGE_SPEC / "config-schema.json",
    "descriptor": IMAGE_SPEC / "content-descriptor.json",
    "layout": IMAGE_SPEC / "image-layout-schema.json",
    "runtime-config": RUNTIME_SPEC / "config-schema.json",
}


@cache
def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _pointer(doc, fragment: str):
    for part in fragment.lstrip("/").split("/"):
        if part:
            doc = doc[part.replace("~1", "/").replace("~0", "~")]
    return doc


def _inline(node, current: Path, depth: int = 0):
    """`node` with every $ref replaced by what it points to, resolved relative to `current`."""
    if depth > 50:
        raise ValueError(f"$ref cycle in {current}")
    if isinstance(node, list):
        return [_inline(item, current, depth) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target, _, fragment = node["$ref"].partition("#")
        path = (current.parent / target).resolve() if target else current
        return _inline(copy.deepcopy(_pointer(_load(path), fragment)), path, depth + 1)
    return {key: _inline(value, current, depth) for key, value in node.items()}


@cache
def schema(kind: str) -> dict:
    """The self-contained schema for `kind`."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown schema kind {kind!r}; known: {', '.join(SCHEMAS)}")
    path = SCHEMAS[kind]
    resolved = _inline(_load(path), path)
    resolved.pop("$schema", None)
    return resolved


def validate(document: dict, kind: str) -> None:
    """Raise jsonschema.ValidationError unless `document` is a valid OCI `kind`."""
    import jsonschema

    validator = jsonschema.Draft4Validator(schema(kind), format_checker=jsonschema.FormatChecker())
    validator.validate(document)


class OciSchema:
    """The `oci_schema` fixture: `oci_schema.validate(document, kind)`; `kinds` lists the kinds."""

    kinds = tuple(SCHEMAS)

    @staticmethod
    def validate(document: dict, kind: str) -> None:
        validate(document, kind)
