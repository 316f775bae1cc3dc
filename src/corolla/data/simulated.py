"""Simulated silos from the user's own data (`corolla sim --data`).

Four layouts, each giving partition id → silo deterministically, so the planner (in the
`corolla sim` process, before anything starts) and every Ray actor agree without
sharing state:

- a folder: one silo per CSV/JSONL/Parquet file, in file-name order;
- a database with several tables (`--table a,b,c`): one silo per table, in that order;
- one source (a file, a saved dataset, one table or query) cut by a column
  (`partition-by`, a natural site id): one silo per distinct value, in sorted order
  (numeric when every value is an integer);
- one source cut by a flwr-datasets partitioner: IID, Dirichlet(α) or pathological-k.

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
from corolla.data.errors import SiloError
from corolla.data.files import FileSource, read_column
from corolla.data.folder import check_schemas, silo_files
from corolla.data.registry import open_source
from corolla.data.saved_dataset import is_saved_dataset
from corolla.data.source import DataSource, SourceOptions, is_url
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
    #: a database's tables (comma-separated: one silo each) or query, a saved DatasetDict's split
    table: str = ""
    query: str = ""
    split: str = ""
    password_file: str = ""

    @classmethod
    def from_config(cls, cfg: Any) -> SimData | None:
        """The run's SimData, or None when it simulates the built-in corpus."""
        if not cfg.sim_data:
            return None
        return cls(path=cfg.sim_data, partition_by=cfg.partition_by, partitioner=cfg.partitioner,
                   alpha=cfg.dirichlet_alpha, classes_per_node=cfg.classes_per_node, seed=cfg.seed,
                   text_column=cfg.text_column, label_column=cfg.label_column, table=cfg.sim_table,
                   query=cfg.sim_query, split=cfg.sim_split, password_file=cfg.sim_password_file)

    @property
    def tables(self) -> list[str]:
        """The tables named by `table` (one silo each when more than one)."""
        return [t.strip() for t in self.table.split(",") if t.strip()]

    @property
    def kind(self) -> str:
        """folder, tables, column or split."""
        if is_url(self.path) and len(self.tables) > 1:
            return "tables"
        if not is_url(self.path) and Path(self.path).is_dir() and not is_saved_dataset(Path(self.path)):
            return "folder"
        return "column" if self.partition_by else "split"

    def open(self, table: str | None = None) -> DataSource:
        """The whole source (or one of its tables), through the same registry real clients use."""
        return open_source(self.path, SourceOptions(table=self.table if table is None else table, query=self.query,
                                                    split=self.split, password_file=self.password_file))


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


__all__ = ["DEFAULT_NODES", "Plan", "SimData", "check_schemas", "column_groups", "load_node", "node_count", "plan",
           "silo_files"]


@functools.lru_cache(maxsize=4)
def column_groups(sd: SimData, column: str) -> tuple[list[str], list[np.ndarray], int]:
    """(distinct values in node order, row indices of each, total rows) of `column` in the simulated source."""
    source = sd.open()
    if column not in source.columns:
        raise SiloError(f"--partition-by {column!r} is not a column of {_name(sd)} (columns: {source.columns}); "
                        "name the column that holds each row's site.")
    col = read_column(source, column)
    if col.null_count:
        raise SiloError(f"{col.null_count} row(s) of {_name(sd)} have no `{column}` value; fill in each row's site or "
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
    if not is_url(sd.path) and not p.exists():
        raise SiloError(f"--data {sd.path!r} does not exist; give a folder of silo files or one CSV/JSONL/Parquet file.")
    if sd.kind == "split":
        return asked or DEFAULT_NODES
    if sd.kind == "tables":
        if sd.partition_by:
            raise SiloError("--partition-by cuts one table, but --table names several (one silo per table); drop "
                            "--partition-by or give one table.")
        n, what = len(sd.tables), "tables of --table"
    elif sd.kind == "folder":
        if sd.partition_by:
            raise SiloError(f"--partition-by cuts one file, but --data {sd.path!r} is a folder (one silo per file); "
                            "drop --partition-by or give one file.")
        n, what = len(silo_files(p)), f"silo files in {p}"
    else:
        values, _, _ = column_groups(sd, sd.partition_by)
        if len(values) == 1:
            raise SiloError(f"--partition-by {sd.partition_by!r} has one value ({values[0]!r}) in {_name(sd)}: that is one "
                            "silo, not a federation; choose a column with a value per site, or drop --partition-by to "
                            "split the file with --partitioner iid|dirichlet|pathological --nodes N.")
        n, what = len(values), f"distinct `{sd.partition_by}` values in {_name(sd)}"
    if asked is not None and asked != n:
        raise SiloError(f"--nodes {asked} does not match the {n} {what} (one node each); drop --nodes.")
    return n


# ---- the actor side: one node's silo -------------------------------------------------------------------------
def _name(sd: SimData) -> str:
    """How messages and plans name the simulated source: a file's name, a URL without credentials."""
    return sd.open().what if is_url(sd.path) else Path(sd.path).name


@functools.lru_cache(maxsize=2)
def _whole(task: Any, sd: SimData) -> datasets.Dataset:
    return task.load_silo(sd.open(), sd.text_column, sd.label_column)


def load_node(task: Any, sd: SimData, pid: int, n: int) -> datasets.Dataset:
    """Partition `pid` of `n`: its own file, its column value's rows, or its share of the split file."""
    if sd.kind == "folder":
        files = silo_files(sd.path)
        if len(files) != n:
            raise SiloError(f"{sd.path} holds {len(files)} silo files but the simulation has {n} nodes; the folder "
                            "changed after the run started.")
        return task.load_silo(FileSource(files[pid]), sd.text_column, sd.label_column)
    if sd.kind == "tables":
        return task.load_silo(sd.open(sd.tables[pid]), sd.text_column, sd.label_column)
    ds = _whole(task, sd)
    if sd.kind == "column":
        values, groups, rows = column_groups(sd, sd.partition_by)
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
            rows = [len(task.load_silo(FileSource(f), sd.text_column, sd.label_column)) for f in files]
            return Plan(len(files), rows, [f.name for f in files], str(Path(sd.path)), labels)
        if sd.kind == "tables":
            rows = [len(task.load_silo(sd.open(t), sd.text_column, sd.label_column)) for t in sd.tables]
            return Plan(len(sd.tables), rows, sd.tables, sd.open(sd.tables[0]).describe().rsplit(",", 1)[0], labels)
        ds = _whole(task, sd)
        if sd.kind == "column":
            values, groups, total = column_groups(sd, sd.partition_by)
            if total != len(ds):
                raise SiloError(f"{sd.path}: the `{sd.partition_by}` column has {total} rows but the silo reader found "
                                f"{len(ds)}; check the file for rows the two readers split differently.")
            return Plan(len(values), [len(g) for g in groups], values, f"{_name(sd)} by `{sd.partition_by}`", labels)
        sizes = data.partition_sizes(ds, nodes, *_scheme(task, sd))
        how = data.describe_scheme(sd.partitioner, sd.alpha, sd.classes_per_node)
        return Plan(nodes, sizes, [f"{how} partition {i}" for i in range(nodes)], f"{_name(sd)}, {how}", labels)


class _label_hint:
    """Turn an unknown-label error into one naming every label the files hold and the --set labels=... fix."""

    def __init__(self, task: Any, sd: SimData) -> None:
        self.task, self.sd = task, sd

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        if not isinstance(exc, SiloError) or "unknown label" not in str(exc) or not TASKS[self.task.name].has_labels:
            return
        sd = self.sd
        if sd.kind == "folder":
            sources = [FileSource(f) for f in silo_files(sd.path)[:1000]]
        else:
            sources = [sd.open(t) for t in sd.tables] if sd.kind == "tables" else [sd.open()]
        found: set[str] = set()
        for source in sources:
            found |= set(pc.unique(read_column(source, sd.label_column)).drop_null().to_pylist())
        names = sorted(found, key=_natural)
        raise SiloError(f"{exc} The silo files hold the labels {names[:30]}: for your own classes pass --set "
                        f"labels={','.join(names[:30])} (in label-id order) and --set test-data=FILE.") from None
