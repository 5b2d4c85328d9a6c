"""JSON Schema of gmesh config documents, so editors validate YAML as users type it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gmesh.config.kinds import API_VERSION, Kind, KindRegistry
from gmesh.config.validate import Metadata


def json_schema(kinds: KindRegistry, only: Kind | None = None) -> dict[str, Any]:
    """One schema accepting any document of the given kinds (all, or `only`)."""
    selected = [only] if only is not None else list(kinds)
    models: list[tuple[type[BaseModel], Literal["validation"]]] = [
        (Metadata, "validation"),
        *((k.spec, "validation") for k in selected),
    ]
    refs, top = models_json_schema(models, by_alias=True, ref_template="#/$defs/{model}")
    metadata_ref = refs[(Metadata, "validation")]
    variants = []
    for kind in selected:
        variants.append(
            {
                "title": kind.name,
                "description": kind.description,
                "type": "object",
                "properties": {
                    "apiVersion": {"const": API_VERSION},
                    "kind": {"const": kind.name},
                    "metadata": metadata_ref,
                    "spec": refs[(kind.spec, "validation")],
                },
                "required": ["kind", "metadata"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gmesh config document",
        "$defs": top.get("$defs", {}),
    }
    if len(variants) == 1:
        schema.update(variants[0])
        schema["title"] = f"gmesh {variants[0]['title']}"
    else:
        schema["oneOf"] = variants
    return schema
