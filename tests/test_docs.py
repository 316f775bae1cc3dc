"""The documentation: the mkdocs site builds with warnings as errors, and the Markdown is clean.

- `mkdocs build --strict` (mkdocs.yml, docs/, the hooks in docs/hooks.py that render bench/results
  and the run-configuration reference): a broken link, anchor or nav entry fails;
- README.md, docs/ and the top-level READMEs (server/, client/, strategies/, proto/) hold no
  work-log talk and link only to files that exist;
- strategies/README.md names every registered component.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TOP_READMES = [ROOT / d / "README.md" for d in ("server", "client", "strategies", "proto")]
#: phrases that belong in a lab notebook, not in documentation
NOTEBOOK = re.compile(r"this session|stop [0-9]+|\(#[0-9]+\)", re.IGNORECASE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *TOP_READMES]


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = tmp_path / "site"
    assert (site / "guide" / "configuration" / "index.html").is_file()
    config_page = (site / "guide" / "configuration" / "index.html").read_text()
    assert "fedhl-weighting" in config_page and "run-config-reference" not in config_page
    for result in (ROOT / "bench" / "results").glob("*.md"):
        assert (site / "benchmarks" / result.stem / "index.html").is_file(), result.name


def test_no_work_log_talk_in_the_docs() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in [*_pages(), *(ROOT / "bench" / "results").glob("*.md")]
            for i, line in enumerate(p.read_text().splitlines(), 1) if NOTEBOOK.search(line)]
    assert not hits, "\n".join(hits)


def _target(page: Path, link: str) -> Path | None:
    """The file a relative link points at (None for URLs and in-page anchors)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
        return None
    path = link.split("#", 1)[0]
    target = (page.parent / path).resolve()
    generated = DOCS / "benchmarks"  # rendered from bench/results by docs/hooks.py
    if target.is_relative_to(generated):
        rel = target.relative_to(generated)
        return ROOT / "bench" / "results" / rel if str(rel) != "index.md" else DOCS / "hooks.py"
    return target


def test_links_point_at_files_that_exist() -> None:
    missing = []
    for page in _pages():
        for link in LINK.findall(page.read_text()):
            target = _target(page, link)
            if target is not None and not target.exists():
                missing.append(f"{page.relative_to(ROOT)} -> {link}")
    assert not missing, "\n".join(missing)


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = ".venv/bin/python -m pytest"
    assert command in ci and command in (ROOT / "README.md").read_text()


def test_strategies_readme_names_every_registered_component() -> None:
    from corolla.strategies.registry import REGISTRIES

    text = (ROOT / "strategies" / "README.md").read_text()
    for kind, registry in REGISTRIES.items():
        section = re.search(rf"^## `{re.escape(kind)}`.*?(?=^## |\Z)", text, re.M | re.S)
        assert section, f"strategies/README.md has no section for `{kind}`"
        for name in registry.names():
            assert f"| `{name}` |" in section[0], f"`{kind}={name}` is missing from strategies/README.md"
