"""`dnc schema` accepts every spec a user can write, as an editor validates it (jsonschema, Draft 2020-12).

A spec is checked as one file, before `extends` is merged, so a spec that extends another
may leave out what its base gives; `dnc validate` checks the merged spec fully.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import ALL_SPECS, ROOT, run_dnc
from ruamel.yaml import YAML

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def validator():
    result = run_dnc("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    return jsonschema.Draft202012Validator(schema)


def load(text: str):
    return YAML(typ="safe", pure=True).load(text)


def readme_specs() -> list[str]:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b for b in blocks if re.search(r"^version:", b, re.M)]


def errors(validator, data) -> list[str]:
    return [e.message for e in validator.iter_errors(data)]


@pytest.mark.parametrize("path", ALL_SPECS, ids=[p.stem for p in ALL_SPECS])
def test_every_shipped_spec_validates(validator, path):
    assert errors(validator, load(path.read_text())) == []


def test_every_readme_spec_validates(validator):
    specs = readme_specs()
    assert len(specs) >= 3
    for text in specs:
        assert errors(validator, load(text)) == [], text


def test_specs_that_extend_are_among_them():
    assert sum("extends:" in p.read_text() for p in ALL_SPECS) >= 9


STANDALONE = """\
version: 1
input: {size: [32, 32]}
growth_rate: 12
blocks: [2, {layers: 3, bn_size: null}]
"""

# (what is wrong, spec text, a part of jsonschema's message)
REJECTED = [
    ("unknown key", STANDALONE + "growth_rat: 12\n", "'growth_rat' was unexpected"),
    ("unknown nested key", STANDALONE + "stem: {knd: cifar}\n", "'knd' was unexpected"),
    ("unknown key in an extending spec", "version: 1\nextends: a.yaml\nhead: {clases: 10}\n", "'clases'"),
    ("wrong type", STANDALONE.replace("growth_rate: 12", "growth_rate: twelve"), "'twelve' is not of type 'integer'"),
    ("wrong type of a block", STANDALONE.replace("[2, {", "[two, {"), "'two' is not valid"),
    ("out of range", STANDALONE + "compression: 1.5\n", "1.5 is greater than the maximum of 1"),
    ("negative", STANDALONE.replace("growth_rate: 12", "growth_rate: -1"), "-1 is less than or equal"),
    ("not a choice", STANDALONE + "stem: {kind: imagnet}\n", "'imagnet' is not one of"),
    ("wrong version", STANDALONE.replace("version: 1", "version: 2"), "1 was expected"),
    ("no version", STANDALONE.replace("version: 1\n", ""), "'version' is a required property"),
    ("standalone without blocks", STANDALONE.replace("blocks: [2, {layers: 3, bn_size: null}]\n", ""), "'blocks'"),
    ("standalone without input.size", STANDALONE.replace("{size: [32, 32]}", "{channels: 1}"), "'size'"),
    ("input size of one number", STANDALONE.replace("[32, 32]", "[32]"), "is too short"),
]


@pytest.mark.parametrize(("what", "text", "message"), REJECTED, ids=[r[0] for r in REJECTED])
def test_schema_rejects(validator, what, text, message):
    found = errors(validator, load(text))
    assert any(message in m for m in found), found


def test_extending_spec_may_leave_out_what_its_base_gives(validator):
    assert errors(validator, load("version: 1\nextends: densenet121.yaml\ninput: {channels: 1}\n")) == []


def test_validate_still_checks_the_merged_spec(validator, tmp_path):
    # the schema cannot see the base: a child of an incomplete base passes it, dnc validate does not
    (tmp_path / "base.yaml").write_text("version: 1\ninput: {size: [32, 32]}\ngrowth_rate: 12\n")
    child = tmp_path / "child.yaml"
    child.write_text("version: 1\nextends: base.yaml\nstem: {kind: cifar}\n")
    assert errors(validator, load(child.read_text())) == []
    result = run_dnc("validate", child)
    assert result.returncode == 2
    assert "missing required field 'blocks'" in result.stderr
