"""The README's examples are true: every YAML spec in it loads and builds."""

from __future__ import annotations

import re

from conftest import ROOT

from dnc.pipeline import build


def test_readme_spec_examples_build(tmp_path):
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    specs = [b for b in blocks if b.startswith("version: 1")]
    assert len(specs) >= 3
    (tmp_path / "densenet121.yaml").write_text((ROOT / "specs" / "densenet121.yaml").read_text())
    for i, text in enumerate(specs):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(text)
        build(path)
