"""The JSON Schema of the spec format, for editors (`dnc schema`)."""

from __future__ import annotations

from dnc.spec import SPEC_VERSION, Spec


def json_schema() -> dict:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://dnc.dev/schema/spec-v{SPEC_VERSION}.json"
    schema["title"] = "dnc DenseNet spec"
    props = schema["properties"]
    # handled by the loader before validation, so not fields of Spec itself
    props["extends"] = {"type": "string", "description": "A spec file (relative to this one) to inherit and override."}
    schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    props["name"]["description"] += " Never inherited through extends."
    props["blocks"]["items"] = {
        "anyOf": [
            {"type": "integer", "exclusiveMinimum": 0, "description": "Shorthand for {layers: N}."},
            props["blocks"]["items"],
        ]
    }
    return schema
