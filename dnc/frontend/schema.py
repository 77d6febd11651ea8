"""The JSON Schema of the spec format, for editors (`dnc schema`).

It describes one file as written, before `extends` is merged: a spec that extends
another may leave out anything its base gives (`input`, `growth_rate`, `blocks`, or
`input.size` inside a partial `input:`), so those are required only when there is no
`extends`. `dnc validate` still checks the merged spec fully.
"""

from __future__ import annotations

from dnc.frontend.spec import SPEC_VERSION, Spec

# required of a spec that extends nothing: what Spec requires (name defaults to the file's)
STANDALONE_REQUIRED = ("input", "growth_rate", "blocks")


def json_schema() -> dict:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://dnc.dev/schema/spec-v{SPEC_VERSION}.json"
    schema["title"] = "dnc DenseNet spec"
    props = schema["properties"]
    # handled by the loader before validation, so not fields of Spec itself
    props["extends"] = {"type": "string", "description": "A spec file (relative to this one) to inherit and override."}
    props["name"]["description"] += " Never inherited through extends."
    props["blocks"]["items"] = {
        "anyOf": [
            {"type": "integer", "exclusiveMinimum": 0, "description": "Shorthand for {layers: N}."},
            props["blocks"]["items"],
        ]
    }
    # a mapping merges key by key under extends, so input.size may come from the base
    input_def = schema["$defs"]["Input"]
    input_def["required"] = [r for r in input_def.get("required", []) if r != "size"]
    if not input_def["required"]:
        del input_def["required"]
    schema["required"] = [r for r in schema.get("required", []) if r not in ("name", *STANDALONE_REQUIRED)]
    schema["if"] = {"not": {"required": ["extends"]}}
    schema["then"] = {
        "required": list(STANDALONE_REQUIRED),
        "properties": {"input": {"required": ["size"]}},
    }
    return schema
