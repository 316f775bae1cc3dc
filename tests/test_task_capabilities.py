"""Tasks declare what they can do (`corolla.spec.TaskInfo`); callers read capabilities, never compare task names."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from corolla.config import RunConfig
from corolla.config.fleet import simulated_rank
from corolla.spec import TASKS

SRC = Path(__file__).resolve().parent.parent / "src" / "corolla"
#: where task names may be written in a comparison: the catalogue and the task definitions
OWNERS = (SRC / "spec.py", SRC / "learning" / "tasks")


def _names_in(node: ast.AST) -> set[str]:
    """Task-name string constants in `node`: a literal, or the items of a literal tuple, list or set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in TASKS}


def test_no_module_outside_the_task_definitions_compares_a_task_name():
    found = []
    for path in SRC.rglob("*.py"):
        if path == OWNERS[0] or OWNERS[1] in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = set().union(*(_names_in(n) for n in (node.left, *node.comparators)))
                if names:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} compares {sorted(names)}")
    assert not found, "read a TaskInfo capability instead of comparing task names:\n" + "\n".join(found)


def test_the_scan_sees_a_comparison():
    """The check above would catch the forms the code used to have."""
    for src in ('x.task == "causal-lm"', 'task.name != "text-classification"', 'x in ("image-classification", "y")'):
        node = ast.parse(src).body[0].value
        assert set().union(*(_names_in(n) for n in (node.left, *node.comparators)))


def test_capabilities_of_the_built_in_tasks():
    caps = {n: (t.uses_lora, t.generates, t.has_labels, t.splits_by_label) for n, t in TASKS.items()}
    assert caps == {"text-classification": (True, False, True, True), "causal-lm": (True, True, False, False),
                    "image-classification": (False, False, True, False)}


def _with(monkeypatch: pytest.MonkeyPatch, task: str, **caps: bool) -> None:
    monkeypatch.setitem(TASKS, task, dataclasses.replace(TASKS[task], **caps))


def test_rank_zero_follows_uses_lora(monkeypatch):
    assert simulated_rank(RunConfig(task="image-classification"), 3) == 0  # the whole model: no adapter rank
    assert simulated_rank(RunConfig(lora_rank=4, max_rank=32), 3) == 4
    _with(monkeypatch, "text-classification", uses_lora=False)
    assert simulated_rank(RunConfig(lora_rank=4, max_rank=32), 3) == 0


def test_partitioner_by_label_follows_splits_by_label(monkeypatch):
    from corolla.data.silo import SiloError
    from corolla.data.simulated import SimData, _scheme

    sd = SimData(path="silos.csv")
    assert _scheme(SimpleNamespace(name="text-classification"), sd)[0] == "dirichlet"
    assert _scheme(SimpleNamespace(name="causal-lm"), dataclasses.replace(sd, partitioner="iid"))[0] == "iid"
    with pytest.raises(SiloError, match="splits by label, and task causal-lm has none"):
        _scheme(SimpleNamespace(name="causal-lm"), sd)
    _with(monkeypatch, "text-classification", splits_by_label=False)
    with pytest.raises(SiloError, match="splits by label"):
        _scheme(SimpleNamespace(name="text-classification"), sd)


def test_label_hint_follows_has_labels(tmp_path):
    from corolla.data.silo import SiloError
    from corolla.data.simulated import SimData, _label_hint

    (tmp_path / "s.csv").write_text("text,label\na,cat\nb,dog\n")
    sd = SimData(path=str(tmp_path / "s.csv"))
    exc = SiloError("unknown label 'cat'")
    assert _label_hint(SimpleNamespace(name="causal-lm"), sd).__exit__(SiloError, exc, None) is None  # passes through
    with pytest.raises(SiloError, match=r"hold the labels \['cat', 'dog'\].*labels=cat,dog"):
        _label_hint(SimpleNamespace(name="text-classification"), sd).__exit__(SiloError, exc, None)


def test_model_checks_follow_generates_and_uses_lora(tmp_path, monkeypatch):
    from corolla.config import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    RunConfig(model=str(tmp_path))  # an encoder classifies
    _with(monkeypatch, "text-classification", generates=True)
    with pytest.raises(ConfigError, match="encoder, which cannot generate; task=text-classification needs a decoder"):
        RunConfig(model=str(tmp_path))
    with pytest.raises(ConfigError, match="a model folder needs task=text-classification or task=causal-lm"):
        RunConfig(task="image-classification", model=str(tmp_path))
    with pytest.raises(ConfigError, match="trains its whole model"):
        RunConfig(task="image-classification", checkpoint_every=1)


def test_generate_follows_generates(tmp_path):
    from corolla.learning.export import ExportError, generate

    (tmp_path / "config.json").write_text(RunConfig().to_json())
    (tmp_path / "global.npz").write_bytes(b"")
    with pytest.raises(ExportError, match="does not generate; `corolla generate` needs a task=causal-lm run"):
        generate(tmp_path, ["hi"])


def test_task_classes_read_the_catalogue():
    """`Task.uses_lora` is the catalogue's, so the trainer, the export and config agree (one statement per task)."""
    from corolla.learning.tasks import build_task
    from corolla.spec import TaskSpec

    for name, info in TASKS.items():
        task = build_task(TaskSpec(task=name))
        assert task.info is info and task.uses_lora is info.uses_lora
