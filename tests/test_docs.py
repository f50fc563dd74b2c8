"""The README and the docs pages: CI runs what the README says, and every link and file they name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bundle" / "docs" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def code_lines(markdown: str) -> list[str]:
    """The lines inside the fenced code blocks of a Markdown text."""
    return [line for block in re.findall(r"```[a-z]*\n(.*?)```", markdown, re.S) for line in block.splitlines()]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to hyphens)."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_ci_installs_and_tests_exactly_as_the_readme_says() -> None:
    """Every command of .ci/run appears, byte for byte and in the same order, in the README's code blocks."""
    ci = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    readme = code_lines((REPO / "README.md").read_text())
    assert ci, "no commands found in .ci/run"
    positions = [readme.index(command) if command in readme else -1 for command in ci]
    assert -1 not in positions, (
        f"commands of .ci/run missing from README.md: {[c for c, i in zip(ci, positions) if i < 0]}"
    )
    assert positions == sorted(positions), "the README lists .ci/run's commands in another order"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_to_existing_files_and_headings(page: Path) -> None:
    text = page.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target} points to nothing"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file.read_text()), f"{page.name}: {file.name} has no heading #{anchor}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_named_configs_and_scripts_exist(page: Path) -> None:
    """The bundle's config files and scripts that a page names (``configs/x.json``, ``scripts/x.py``) exist."""
    text = page.read_text()
    for config in re.findall(r"configs/([\w.]+\.json)", text):
        assert (REPO / "bundle" / "configs" / config).is_file(), f"{page.name} names configs/{config}: not there"
    for script in re.findall(r"scripts/(\w+\.py)", text):
        assert (REPO / "bundle" / "scripts" / script).is_file(), f"{page.name} names scripts/{script}: not there"
