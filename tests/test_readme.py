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


def prose(markdown: str) -> str:
    """The README without its fenced code blocks (examples, not links)."""
    return re.sub(r"^(`{3,}).*?^\1\s*$", "", markdown, flags=re.S | re.M)


def test_readme_links_only_to_files_in_the_repository():
    text = prose((ROOT / "README.md").read_text())
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"(?:src|href)=\"([^\"]+)\"", text)
    assert targets, "the README links to docs/architecture.md at least"
    for target in targets:
        assert "://" not in target and not target.startswith("//"), f"link out of the repository: {target}"
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"broken link: {target}"
    without_code = re.sub(r"`[^`\n]+`", "", text)  # commands in inline code are not links
    assert not re.search(r"https?://", without_code), "URLs in the README's prose"


def test_graph_image_without_output_writes_an_ignored_file(tmp_path):
    import shutil
    import subprocess

    from conftest import run_dnc

    name = "densenet_bc100_k12"
    for picture in (f"{name}.svg", f"{name}.png"):
        ignored = subprocess.run(["git", "check-ignore", "-q", picture], cwd=ROOT)
        assert ignored.returncode == 0, f"{picture} in the repository root is ignored"
    if shutil.which("dot") is None:
        return
    out = ROOT / f"{name}.svg"
    existed = out.exists()
    try:
        result = run_dnc("graph", f"specs/{name}.yaml", "--format", "svg")
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == f"wrote {name}.svg" and out.is_file()  # where the README says
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        assert f"{name}.svg" not in status.stdout
    finally:
        if not existed:
            out.unlink(missing_ok=True)


def test_readme_states_verify_tolerance_as_the_code_does():
    from dnc.check.verify import TOLERANCE

    text = (ROOT / "README.md").read_text()
    assert TOLERANCE == 1e-5
    assert "max abs error / max |reference| <= 1e-5" in text


def test_readme_markdown_diff_example_is_what_dnc_prints():
    from conftest import dnc_cli

    shown = re.search(r"````markdown\n(.*?)````\n", (ROOT / "README.md").read_text(), re.S).group(1)
    result = dnc_cli("diff", "specs/densenet121.yaml", "specs/densenet169.yaml", "--format", "markdown")
    assert result.returncode == 1 and result.stdout == shown
