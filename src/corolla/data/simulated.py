"""Simulated silos from the user's own data (`corolla sim --data`).

Three layouts, each giving partition id → silo deterministically, so the planner (in the
`corolla sim` process, before anything starts) and every Ray actor agree without
sharing state:

- a folder: one silo per CSV/JSONL/Parquet file, in file-name order;
- one file cut by a column (`partition-by`, a natural site id): one silo per distinct
  value, in sorted order (numeric when every value is an integer);
- one file cut by a flwr-datasets partitioner: IID, Dirichlet(α) or pathological-k.

Every silo is read by the task's own `load_silo`, the reader real clients use, so
simulated and real silos accept and refuse the same files.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from corolla.data import silo as data
from corolla.data.silo import SiloError
from corolla.spec import TASKS

#: nodes of a split file when `--nodes` is not given (the built-in corpus's default too)
DEFAULT_NODES = 20


@dataclass(frozen=True)
class SimData:
    """Where simulated silos come from (the run configuration's sim-data keys)."""

    path: str
    partition_by: str = ""
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    classes_per_node: int = 2
    seed: int = 0
    text_column: str = "text"
    label_column: str = "label"

    @classmethod
    def from_config(cls, cfg: Any) -> SimData | None:
        """The run's SimData, or None when it simulates the built-in corpus."""
        if not cfg.sim_data:
            return None
        return cls(path=cfg.sim_data, partition_by=cfg.partition_by, partitioner=cfg.partitioner,
                   alpha=cfg.dirichlet_alpha, classes_per_node=cfg.classes_per_node, seed=cfg.seed,
                   text_column=cfg.text_column, label_column=cfg.label_column)

    @property
    def kind(self) -> str:
        """folder, column or split."""
        if Path(self.path).is_dir():
            return "folder"
        return "column" if self.partition_by else "split"


@dataclass
class Plan:
    """What a simulation will train on: node count, rows per node, and a name per node."""

    nodes: int
    rows: list[int]
    names: list[str]
    source: str
    labels: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the console."""
        if not self.rows:
            return f"{self.nodes} simulated silos from {self.source}"
        r = np.asarray(self.rows)
        return (f"{self.nodes} simulated silos from {self.source}: {int(r.sum()):,} rows, "
                f"{int(r.min()):,}–{int(r.max()):,} per silo (median {int(np.median(r)):,})")

    def to_json(self) -> str:
        """`silos.json`: which partition id is which silo."""
        return json.dumps({"source": self.source, "nodes": self.nodes,
                           "silos": [{"partition-id": i, "silo": n, "rows": r}
                                     for i, (n, r) in enumerate(zip(self.names, self.rows))]}, indent=1)


def silo_files(folder: str | Path) -> list[Path]:
    """The silo files of a folder, sorted by name; SiloError when it holds none."""
    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in data.SILO_FORMATS
                   and not p.name.startswith("."))
    if not files:
        seen = sorted(p.name for p in root.iterdir())[:5]
        raise SiloError(f"the data folder {str(root)!r} holds no silo files ({', '.join(sorted(data.SILO_FORMATS))}; "
                        f"found {seen or 'nothing'}); put one CSV, JSONL or Parquet file per silo there.")
    return files


def check_schemas(files: list[Path]) -> list[str]:
    """The columns every silo file shares; SiloError naming two files whose columns differ."""
    first = data.file_columns(files[0])
    for f in files[1:]:
        cols = data.file_columns(f)
        if set(cols) != set(first):
            raise SiloError(f"silo files have mixed schemas: {files[0].name} has columns {first} but {f.name} has "
                            f"{cols}; give every silo file in the folder the same columns.")
    return first


@functools.lru_cache(maxsize=4)
def column_groups(path: str, column: str) -> tuple[list[str], list[np.ndarray], int]:
    """(distinct values in node order, row indices of each, total rows) of `column` in a silo file."""
    p = Path(path)
    if column not in data.file_columns(p):
        raise SiloError(f"--partition-by {column!r} is not a column of {p.name} (columns: {data.file_columns(p)}); "
                        "name the column that holds each row's site.")
    col = data.read_column(p, column)
    if col.null_count:
        raise SiloError(f"{col.null_count} row(s) of {p.name} have no `{column}` value; fill in each row's site or "
                        "drop those rows.")
    values = col.to_numpy(zero_copy_only=False).astype(str)
    uniq, inverse = np.unique(values, return_inverse=True)
    order = sorted(range(len(uniq)), key=lambda i: _natural(uniq[i]))
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq))
    node = rank[inverse]
    idx = np.argsort(node, kind="stable")
    groups = np.split(idx, np.cumsum(np.bincount(node, minlength=len(uniq)))[:-1])
    return [str(uniq[i]) for i in order], groups, len(values)


def _natural(v: str) -> tuple:
    s = v.strip()
    return (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)


def node_count(sd: SimData, asked: int | None) -> int:
    """Nodes of the simulation: one per silo file / column value; `asked` (or DEFAULT_NODES) for a split file."""
    p = Path(sd.path)
    if not p.exists():
        raise SiloError(f"--data {sd.path!r} does not exist; give a folder of silo files or one CSV/JSONL/Parquet file.")
    if sd.kind == "split":
        return asked or DEFAULT_NODES
    if sd.kind == "folder":
        if sd.partition_by:
            raise SiloError(f"--partition-by cuts one file, but --data {sd.path!r} is a folder (one silo per file); "
                            "drop --partition-by or give one file.")
        n, what = len(silo_files(p)), f"silo files in {p}"
    else:
        values, _, _ = column_groups(str(p), sd.partition_by)
        if len(values) == 1:
            raise SiloError(f"--partition-by {sd.partition_by!r} has one value ({values[0]!r}) in {p.name}: that is one "
                            "silo, not a federation; choose a column with a value per site, or drop --partition-by to "
                            "split the file with --partitioner iid|dirichlet|pathological --nodes N.")
        n, what = len(values), f"distinct `{sd.partition_by}` values in {p.name}"
    if asked is not None and asked != n:
        raise SiloError(f"--nodes {asked} does not match the {n} {what} (one node each); drop --nodes.")
    return n


# ---- the actor side: one node's silo -------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _whole(task: Any, path: str, text_column: str, label_column: str) -> datasets.Dataset:
    return task.load_silo(path, text_column, label_column)


def load_node(task: Any, sd: SimData, pid: int, n: int) -> datasets.Dataset:
    """Partition `pid` of `n`: its own file, its column value's rows, or its share of the split file."""
    if sd.kind == "folder":
        files = silo_files(sd.path)
        if len(files) != n:
            raise SiloError(f"{sd.path} holds {len(files)} silo files but the simulation has {n} nodes; the folder "
                            "changed after the run started.")
        return task.load_silo(str(files[pid]), sd.text_column, sd.label_column)
    ds = _whole(task, sd.path, sd.text_column, sd.label_column)
    if sd.kind == "column":
        values, groups, rows = column_groups(sd.path, sd.partition_by)
        if rows != len(ds) or len(values) != n:
            raise SiloError(f"{sd.path}: the `{sd.partition_by}` column has {rows} rows and {len(values)} values but "
                            f"the silo reader found {len(ds)} rows for {n} nodes; the file changed after the run "
                            "started, or has rows the two readers split differently.")
        return ds.select(groups[pid])
    return data.partition_of(ds, pid, n, *_scheme(task, sd))


def _scheme(task: Any, sd: SimData) -> tuple[str, float, int, int]:
    if sd.partitioner != "iid" and not TASKS[task.name].splits_by_label:
        raise SiloError(f"partitioner={sd.partitioner} splits by label, and task {task.name} has none; use --partitioner "
                        "iid or --partition-by COLUMN.")
    return sd.partitioner, sd.alpha, sd.classes_per_node, sd.seed


# ---- the planner: every check before the run starts ---------------------------------------------------------
def plan(task: Any, sd: SimData | None, nodes: int, alpha: float) -> Plan:
    """Check that every simulated silo loads and every node gets rows; return the plan. Raises SiloError."""
    labels = list(getattr(task.spec, "labels", ()) or ())
    if sd is None:
        if labels:
            raise SiloError(f"labels {labels} are your own classes, so the built-in corpus cannot be used: give the "
                            "simulated nodes your silo files with `corolla sim --data DIR` (or --data FILE).")
        try:
            task.builtin_partition(0, nodes, alpha)  # draws every partition (PartitionError with the numbers)
        except data.PartitionError as e:
            raise data.PartitionError(f"the built-in {task.spec.dataset} corpus's training split: {e}") from None
        how = data.describe_scheme("dirichlet" if alpha > 0 else "iid", alpha, 0)
        return Plan(nodes, [], [], f"the built-in {task.spec.dataset} corpus, {how}")
    with _label_hint(task, sd):
        if sd.kind == "folder":
            files = silo_files(sd.path)
            check_schemas(files)
            rows = [len(task.load_silo(str(f), sd.text_column, sd.label_column)) for f in files]
            return Plan(len(files), rows, [f.name for f in files], str(Path(sd.path)), labels)
        ds = _whole(task, sd.path, sd.text_column, sd.label_column)
        if sd.kind == "column":
            values, groups, total = column_groups(sd.path, sd.partition_by)
            if total != len(ds):
                raise SiloError(f"{sd.path}: the `{sd.partition_by}` column has {total} rows but the silo reader found "
                                f"{len(ds)}; check the file for rows the two readers split differently.")
            return Plan(len(values), [len(g) for g in groups], values,
                        f"{Path(sd.path).name} by `{sd.partition_by}`", labels)
        sizes = data.partition_sizes(ds, nodes, *_scheme(task, sd))
        how = data.describe_scheme(sd.partitioner, sd.alpha, sd.classes_per_node)
        return Plan(nodes, sizes, [f"{how} partition {i}" for i in range(nodes)], f"{Path(sd.path).name}, {how}", labels)


class _label_hint:
    """Turn an unknown-label error into one naming every label the files hold and the --set labels=... fix."""

    def __init__(self, task: Any, sd: SimData) -> None:
        self.task, self.sd = task, sd

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        if not isinstance(exc, SiloError) or "unknown label" not in str(exc) or not TASKS[self.task.name].has_labels:
            return
        files = silo_files(self.sd.path) if self.sd.kind == "folder" else [Path(self.sd.path)]
        found: set[str] = set()
        for f in files[:1000]:
            found |= set(pc.unique(data.read_column(f, self.sd.label_column)).drop_null().to_pylist())
        names = sorted(found, key=_natural)
        raise SiloError(f"{exc} The silo files hold the labels {names[:30]}: for your own classes pass --set "
                        f"labels={','.join(names[:30])} (in label-id order) and --set test-data=FILE.") from None
