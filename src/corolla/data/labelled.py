"""Labelled text from any DataSource: a `text` column and a `label` column of class names or ids.

Validated batch by batch with vectorised Arrow passes: missing columns and wrong
column types (a text column of numbers, a label column of floats) raise at once;
empty texts are counted over all rows and the first unknown label remembered, and
both raise after the last batch, as does a source without rows. The result is a
Dataset with `text` (string) and `label` (ClassLabel of the run's names), in memory
or memory-mapped from the silo cache (see `corolla.data.cache`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from corolla.data import cache
from corolla.data.errors import SiloError
from corolla.data.files import as_string
from corolla.data.source import DataSource

SCHEMA = pa.schema([("text", pa.string()), ("label", pa.int64())])
#: rows read per batch (a text silo's rows are a few KiB: a batch is a few MiB at most)
BATCH_ROWS = 8192


def load_labelled(source: DataSource, label_names: tuple[str, ...], text_column: str = "text",
                  label_column: str = "label", cache_dir: str | os.PathLike[str] | None = None) -> datasets.Dataset:
    """Read `source` into a Dataset with columns `text` and `label` (ClassLabel of `label_names`).

    Labels may be class names or integer ids. Raises SiloError for missing columns,
    wrong column types, no rows, empty texts or unknown labels.
    """
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(label_names))})
    reader = LabelledReader(source, text_column, label_column, label_names)
    reader.check_schema()
    key = source.cache_key()
    target = cache.cache_target(source.cache_stem, f"{source.identity()}|{text_column}|{label_column}",
                                f"{key}|{'|'.join(label_names)}", cache_dir)
    return cache.materialize(reader.batches, SCHEMA, datasets.DatasetInfo(features=features), target,
                             source.size_bytes(), key is not None, source.what, reader.check_complete)


class LabelledReader:
    """Reads a source into (text, label id) record batches, validating as it goes."""

    def __init__(self, source: DataSource, text_column: str, label_column: str, label_names: tuple[str, ...]) -> None:
        self.source, self.what = source, source.what
        self.text_column, self.label_column = text_column, label_column
        self.names = pa.array(list(label_names), pa.string())
        self.ids = pa.array([str(i) for i in range(len(label_names))], pa.string())
        self.label_names = label_names
        self.rows = self.empty_texts = 0
        self.unknown: list[object] = []

    def check_schema(self) -> None:
        """Both columns exist, and a source with declared types declares text and class-like labels."""
        columns = self.source.columns
        missing = [c for c in (self.text_column, self.label_column) if c not in columns]
        if missing:
            raise SiloError(f"{self.what} has no column(s) {missing}; its columns are {columns}. "
                            "Set --text-column / --label-column to the right names.")
        check_text_type(self.source.column_type(self.text_column), self.what, self.text_column)
        check_label_type(self.source.column_type(self.label_column), self.what, self.label_column)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yield validated record batches of `text` (string) and `label` (int64 id)."""
        self.rows = self.empty_texts = 0
        self.unknown = []
        for batch in self.source.iter_batches([self.text_column, self.label_column], BATCH_ROWS):
            if batch.num_rows:
                yield self._convert(batch)

    def check_complete(self) -> None:
        """Raise SiloError for a source without rows, with empty texts or with an unknown label."""
        if self.rows == 0:
            raise SiloError(f"{self.what} has no rows; a client needs at least one labelled example.")
        if self.empty_texts:
            raise SiloError(f"{self.what}: {self.empty_texts} row(s) have an empty `{self.text_column}`; "
                            "remove or fill them.")
        if self.unknown:
            n = len(self.label_names)
            raise SiloError(f"{self.what}: unknown label {_show(self.unknown[0])}; valid labels are "
                            f"{list(self.label_names)} or ids 0..{n - 1}.")

    def _convert(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        text_col = pa.chunked_array([batch.column(self.text_column)])
        label_col = pa.chunked_array([batch.column(self.label_column)])
        check_text_type(text_col.type, self.what, self.text_column)
        check_label_type(label_col.type, self.what, self.label_column)
        text = as_string(text_col, self.what, self.text_column).combine_chunks()
        raw = as_string(label_col, self.what, self.label_column).combine_chunks()
        empty = pc.fill_null(pc.or_(pc.equal(pc.binary_length(text), 0), pc.utf8_is_space(text)), True)
        self.empty_texts += pc.sum(empty).as_py() or 0
        by_name = pc.index_in(raw, value_set=self.names)  # a name first (a class may be called "3")
        by_id = pc.index_in(pc.utf8_trim_whitespace(raw), value_set=self.ids)  # then an id 0..n-1
        label = pc.coalesce(by_name, by_id).cast(pa.int64())
        if not self.unknown and label.null_count:
            self.unknown.append(raw[pc.index(label.is_null(), True).as_py()].as_py())
        self.rows += batch.num_rows
        return pa.RecordBatch.from_arrays([text, pc.fill_null(label, -1)], schema=SCHEMA)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) or (
        pa.types.is_dictionary(t) and _is_text(t.value_type))


def check_text_type(t: pa.DataType | None, what: str, column: str) -> None:
    """A text column holds text (None: the source reads everything as text, as CSV does)."""
    if t is not None and not _is_text(t):
        raise SiloError(f"{what}: column `{column}` holds {t} values, not text; name the column that holds the "
                        "texts with --text-column (or cast it to text, e.g. CAST(col AS TEXT) in a --query).")


def check_label_type(t: pa.DataType | None, what: str, column: str) -> None:
    """A label column holds class names or integer ids: floats, dates and nested values are not classes."""
    if t is None or _is_text(t) or pa.types.is_integer(t):
        return
    raise SiloError(f"{what}: column `{column}` holds {t} values, but classes are names or integer ids; name the "
                    "class column with --label-column, or convert it (e.g. CAST(col AS INTEGER) in a --query).")


def _show(value: object) -> str:
    """How an unknown label is quoted in the error: an integer as a number (7), anything else as repr ('cooking')."""
    if isinstance(value, str) and value.lstrip("-").isdigit() and value == str(int(value)):
        return value
    return repr(value)
