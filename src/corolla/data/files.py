"""The file connector: one CSV, JSONL (or JSON array) or Parquet file, streamed in bounded chunks.

What institutions plug in most. CSV cells are read as text (a label `3` is the text
"3", matched to a class name first, then an id); JSONL and Parquet keep their types.
A CSV or JSONL file is read STREAM_CHUNK_BYTES at a time and a Parquet file one row
group at a time, so a file of any size is read in bounded memory; the formats that
can only be parsed whole (one JSON array; a Parquet row group larger than
PARQUET_MAX_ROW_GROUP_BYTES) are refused above the in-memory limit with the fix.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from corolla.data import cache
from corolla.data.errors import SiloError
from corolla.data.source import DEFAULT_BATCH_ROWS, DataSource, SourceOptions, is_url

SILO_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
#: bytes read per chunk when streaming a CSV or JSONL silo (one chunk is in memory at a time)
STREAM_CHUNK_BYTES = 4 * 2**20
#: a streamed Parquet silo is read one row group at a time: larger row groups are refused
PARQUET_MAX_ROW_GROUP_BYTES = 256 * 2**20


class FileSource(DataSource):
    """One silo file; the format comes from its suffix."""

    @classmethod
    def accepts(cls, location: str) -> bool:
        """Any local path that is not a folder (a missing file is refused by `open` with the fix)."""
        return not is_url(location) and not Path(location).is_dir()

    @classmethod
    def open(cls, location: str, options: SourceOptions) -> FileSource:
        """Check the file exists and has a known format; refuse database/dataset flags, which do not apply."""
        options.refuse_any(location, "a file")
        return cls(location)

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise SiloError(f"silo file {str(p)!r} does not exist; pass --data with the path of a CSV, JSONL or "
                            "Parquet file.")
        fmt = SILO_FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise SiloError(f"silo file {p.name!r} has an unknown format; use one of {sorted(SILO_FORMATS)}.")
        self.path, self.fmt, self.name = p, fmt, p.name
        self.what = f"silo file {p.name!r}"
        self._columns: list[str] | None = None

    # ---- what the source is ---------------------------------------------------------------------
    def describe(self) -> str:
        """`csv file /abs/path.csv (12.3 MiB)`."""
        return f"{self.fmt} file {self.path.resolve()} ({self.size_bytes() / 2**20:.1f} MiB)"

    def identity(self) -> str:
        """The file's absolute path."""
        return str(self.path.resolve())

    def size_bytes(self) -> int:
        """The file's size."""
        return self.path.stat().st_size

    def cache_key(self) -> str:
        """Path, size and modification time: a rewritten file gets a new key."""
        st = self.path.stat()
        return f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    @property
    def cache_stem(self) -> str:
        """The file's stem (`big.csv` is cached as `big-<hash>-<hash>.arrow`)."""
        return self.path.stem

    @property
    def num_rows(self) -> int | None:
        """A Parquet file's row count (its footer); None for text formats."""
        return pq.ParquetFile(self.path).metadata.num_rows if self.fmt == "parquet" else None

    def column_type(self, column: str) -> pa.DataType | None:
        """Parquet's declared type; None for CSV (text) and JSON (types inferred per chunk)."""
        if self.fmt != "parquet":
            return None
        schema = pq.ParquetFile(self.path).schema_arrow
        return schema.field(column).type if column in schema.names else None

    @property
    def columns(self) -> list[str]:
        """A CSV's header, a Parquet schema, the keys of the first JSON rows (read once)."""
        if self._columns is None:
            self._columns = self._read_columns()
        return self._columns

    def _read_columns(self) -> list[str]:
        p = self.path
        try:
            if self.fmt == "csv":
                with p.open(newline="", encoding="utf-8-sig", errors="replace") as f:
                    header = next(csv.reader(f), None)
                if header is None:
                    raise SiloError(f"silo file {self.name!r} is empty (not even a header line); write a header line "
                                    "naming the columns and at least one row.")
                return list(header)
            if self.fmt == "parquet":
                return list(pq.ParquetFile(p).schema_arrow.names)
            with p.open("rb") as f:
                head = f.read(4096).lstrip()
                f.seek(0)
                if head.startswith(b"["):
                    self._refuse_large_array()
                    rows = json.load(f)
                else:
                    rows = [json.loads(line) for line, _ in zip((ln for ln in f if ln.strip()), range(100))]
            return list(dict.fromkeys(k for r in rows[:1000] if isinstance(r, dict) for k in r))
        except SiloError:
            raise
        except (OSError, ValueError, pa.ArrowException) as e:
            raise SiloError(f"silo file {self.name!r} could not be parsed as {self.fmt}: {str(e)[:300]}") from e

    def _refuse_large_array(self) -> None:
        size = self.size_bytes()
        if size > cache.IN_MEMORY_MAX_BYTES:
            raise SiloError(
                f"silo file {self.name!r} is one JSON array ({size / 2**20:.0f} MiB), which cannot be read "
                f"in a streaming way above {cache.IN_MEMORY_MAX_BYTES // 2**20} MiB; convert it to JSON Lines (one "
                "object per line), e.g. `jq -c '.[]' silo.json > silo.jsonl`.")

    def check_columns(self, wanted: Sequence[str], hint: str) -> None:
        """SiloError naming the missing columns, the file's columns and `hint` (the flag that fixes it)."""
        missing = [c for c in wanted if c not in self.columns]
        if missing:
            raise SiloError(f"{self.what} has no column(s) {missing}; its columns are {self.columns}. {hint}")

    # ---- the rows ---------------------------------------------------------------------------------
    def iter_batches(self, columns: Sequence[str] | None = None,
                     batch_size: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """The rows of `columns`, one read block (or row group) at a time, re-cut to `batch_size` rows."""
        cols = list(dict.fromkeys(columns or self.columns))
        self.check_columns(cols, "Name columns the file has.")
        for table in self._tables(cols):
            if table.num_rows:
                yield from table.combine_chunks().to_batches(max_chunksize=batch_size)

    def _tables(self, cols: list[str]) -> Iterator[pa.Table]:
        try:
            yield from {"csv": self._csv, "jsonl": self._jsonl, "parquet": self._parquet}[self.fmt](cols)
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

    def _csv(self, cols: list[str]) -> Iterator[pa.Table]:
        reader = pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=STREAM_CHUNK_BYTES),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(include_columns=cols, column_types={c: pa.string() for c in cols},
                                                 strings_can_be_null=True),
        )
        for batch in reader:
            yield pa.Table.from_batches([batch])

    def _jsonl(self, cols: list[str]) -> Iterator[pa.Table]:
        with self.path.open("rb") as f:
            head = f.read(4096).lstrip()
            if head.startswith(b"["):  # one JSON array, not JSON Lines: only parsable whole
                self._refuse_large_array()
                f.seek(0)
                rows = json.load(f)
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise ValueError("a JSON silo is JSON Lines (one object per line) or one array of objects")
                yield _rows_table(rows, cols)
                return
            f.seek(0)
            while chunk := f.read(STREAM_CHUNK_BYTES):
                chunk += f.readline()
                yield _json_chunk(chunk, cols)

    def _parquet(self, cols: list[str]) -> Iterator[pa.Table]:
        pf = pq.ParquetFile(self.path)
        idx = [pf.schema_arrow.get_field_index(c) for c in cols]
        if self.size_bytes() > cache.IN_MEMORY_MAX_BYTES:
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


def _json_chunk(chunk: bytes, cols: list[str]) -> pa.Table:
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
        return _rows_table(rows, cols)
    return pa.table({c: table.column(c) if c in table.column_names else pa.nulls(table.num_rows, pa.string())
                     for c in cols})


def _rows_table(rows: list[dict], cols: list[str]) -> pa.Table:
    """Rows parsed in Python: plain values as the text a CSV cell would hold; nested values kept (chat turns)."""
    out = {}
    for c in cols:
        values = [r.get(c) for r in rows]
        nested = any(isinstance(v, list | dict) for v in values)
        out[c] = pa.array(values) if nested else pa.array([json_str(v) for v in values], pa.string())
    return pa.table(out)


def json_str(value: object) -> str | None:
    """A JSON value as the text a CSV cell would hold (None stays None: an empty text or an unknown label)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return json.dumps(value)
    return str(value)


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n}-byte"


def file_columns(path: str | Path) -> list[str]:
    """The columns of a silo file, read cheaply: a CSV's header, a Parquet schema, the keys of the first JSON rows."""
    return FileSource(path).columns


def read_column(source: DataSource, column: str) -> pa.ChunkedArray:
    """One column of a source as strings, streamed; position i is row i of the source (as every reader sees it)."""
    if column not in source.columns:
        raise SiloError(f"{source.what} has no column {column!r}; its columns are {source.columns}.")
    chunks = [as_string(pa.chunked_array([b.column(0)]), source.what, column)
              for b in source.iter_batches([column])]
    return pa.chunked_array([c for ch in chunks for c in ch.chunks], pa.string())


def as_string(col: pa.ChunkedArray, what: str, name: str) -> pa.ChunkedArray:
    """A column as strings (integer ids become "3"); nested values are refused."""
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise SiloError(f"{what}: column `{name}` holds {col.type} values; it must hold text or "
                        "integer ids.") from None
