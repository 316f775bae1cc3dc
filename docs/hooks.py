"""MkDocs hooks: pages generated at build time from the project's own sources, so they cannot drift.

- Benchmarks: every `bench/results/*.md` (and the `.png` plots beside it) becomes a page under
  `benchmarks/`, listed in the nav and on a generated `benchmarks/index.md`. `bench/results`
  stays the single source; nothing is copied into `docs/`.
- Configuration: the marker `<!-- run-config-reference -->` in `guide/configuration.md` is
  replaced by a table of every `RunConfig` field (key, default, choices, bound, when it is read,
  help), built from `dataclasses.fields(RunConfig)` and `RunConfig()`, plus the component
  choices of `corolla.strategies.registry.REGISTRIES`.

Registered in `mkdocs.yml` under `hooks:`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCH_DIR = "benchmarks"
BENCH_SECTION = "Benchmarks"
CONFIG_MARKER = "<!-- run-config-reference -->"


def _results() -> list[Path]:
    """The benchmark result pages, sorted by name."""
    return sorted(RESULTS.glob("*.md"))


def _title(path: Path) -> str:
    """A page's nav title from its file name: `fedhl_weighting` → `FedHL weighting`."""
    words = path.stem.split("_")
    names = {"fedhl": "FedHL", "fedfix": "FedFix", "llm": "LLM", "gpu": "GPU", "svd": "SVD"}
    text = " ".join(names.get(w, w) for w in words)
    return text[0].upper() + text[1:]


def _first_heading(text: str) -> str | None:
    """The text of the page's first `# ` heading, or None."""
    m = re.search(r"^# (.+)$", text, flags=re.MULTILINE)
    return m[1].strip() if m else None


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Append one nav entry per benchmark result to the `Benchmarks` section of the nav."""
    for item in config.nav or []:
        if isinstance(item, dict) and BENCH_SECTION in item:
            section = item[BENCH_SECTION]
            entries = section if isinstance(section, list) else [section]
            entries += [{_title(p): f"{BENCH_DIR}/{p.name}"} for p in _results()]
            item[BENCH_SECTION] = entries
    return config


def _bench_page(path: Path) -> str:
    """A result page as the site shows it: a heading if it has none, then the file as written by its benchmark."""
    text = path.read_text(encoding="utf-8")
    head = "" if _first_heading(text) else f"# {_title(path)}\n\n"
    note = f"*Generated from `bench/results/{path.name}`.*\n\n"
    if head:
        return head + note + text
    first, _, rest = text.partition("\n")
    return f"{first}\n\n{note}{rest}"


def _bench_index(results: list[Path]) -> str:
    """The benchmarks' landing page: one row per result file."""
    rows = ["| page | what it measures |", "|---|---|"]
    for p in results:
        heading = _first_heading(p.read_text(encoding="utf-8")) or _title(p)
        rows.append(f"| [{_title(p)}]({p.name}) | {heading.replace('|', '/')} |")
    return "\n".join([
        "# Benchmarks",
        "",
        "Each benchmark in `bench/` is one command. It prints a table with ratios against a baseline measured in "
        "the same run, and writes `bench/results/<name>.{md,json,png}`. These pages are those files, rendered at "
        "build time. Unless a page says otherwise, the numbers come from a 2-core machine without a GPU.",
        "",
        "The design decisions these numbers support are summarised in [Design](../design.md).",
        "",
        *rows,
        "",
    ])


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated benchmark pages and their plots to the site's files."""
    results = _results()
    files.append(File.generated(config, f"{BENCH_DIR}/index.md", content=_bench_index(results)))
    for p in results:
        files.append(File.generated(config, f"{BENCH_DIR}/{p.name}", content=_bench_page(p)))
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"{BENCH_DIR}/{png.name}", abs_src_path=str(png)))
    return files


def _cell(value: Any) -> str:
    """A value as a Markdown table cell (pipes escaped, empty strings shown as "")."""
    text = '""' if value == "" else f"`{value}`" if not isinstance(value, str) or " " not in value else str(value)
    return text.replace("|", "\\|")


def _import_corolla() -> tuple[Any, Any]:
    """`RunConfig` and `REGISTRIES`, from the checkout's `src/` when corolla is not importable as installed."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from corolla.config import RunConfig
    from corolla.strategies.registry import REGISTRIES

    return RunConfig, REGISTRIES


def run_config_reference() -> str:
    """Markdown tables of every run-configuration key and every component choice."""
    run_config, registries = _import_corolla()
    defaults = run_config()
    rows = ["| key | default | valid values | read when | what it does |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(run_config):
        meta = f.metadata
        key = f.name.replace("_", "-")
        valid = ", ".join(f"`{c}`" for c in meta["choices"]) if meta.get("choices") else (
            f"≥ {meta['low']:g}" if meta.get("low") is not None else "")
        when = []
        if meta.get("when"):
            when.append(f"`{meta['when']}`")
        if meta.get("owners"):
            when.append(", ".join(f"`{o}`" for o in meta["owners"]))
        if meta.get("scope"):
            when.append("simulation only")
        help_text = str(meta.get("help", "")).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {_cell(getattr(defaults, f.name))} | {valid} | {'; '.join(when) or 'always'} | "
                    f"{help_text} |")
    parts = ["### Keys", "", *rows, "", "### Component choices", ""]
    for kind, reg in registries.items():
        parts += [f"`{kind}`:", "", "| name | what it is |", "|---|---|"]
        parts += [f"| `{name}` | {reg[name].help.replace('|', '/')} |" for name in reg.names()]
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Replace the configuration marker with the generated reference."""
    if CONFIG_MARKER in markdown:
        return markdown.replace(CONFIG_MARKER, run_config_reference())
    return markdown
