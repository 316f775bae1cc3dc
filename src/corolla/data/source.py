"""The data-source seam: rows with named columns, read in bounded batches, whatever holds them.

A task never opens a file or a database: it receives a `DataSource` and reads the
columns it needs with `iter_batches`, which yields pyarrow RecordBatches of at most
`batch_size` rows (pyarrow's `ParquetFile.iter_batches` convention), so memory is
bounded by the batch, not by the silo. Connectors (one file each: files.py,
folder.py, saved_dataset.py, sql.py) implement this class and are listed in
`corolla.data.registry`, which maps a `--data` string to one of them.

This module imports nothing heavy: the CLI uses `is_url` / `normalize_location` to
leave URLs alone before any data library is loaded.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corolla.data.errors import SiloError

if TYPE_CHECKING:
    import pyarrow as pa

#: rows per batch when the caller does not say (pyarrow's default for Parquet)
DEFAULT_BATCH_ROWS = 65_536
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(location: str) -> bool:
    """True for `scheme://...` (a database or other remote source), False for a local path."""
    return bool(_URL.match(location or ""))


def normalize_location(location: str) -> str:
    """An absolute path for a local path (Ray actors run elsewhere); a URL unchanged (never `Path.resolve`d)."""
    return location if is_url(location) else str(Path(location).expanduser().resolve())


@dataclass(frozen=True)
class SourceOptions:
    """How to read a `--data` location beyond its name: the connector-specific flags.

    `table` / `query` select rows of a database, `split` a split of a saved
    DatasetDict, `password_file` holds a database password (never the password
    itself: that comes from the environment or this file, never from a configuration).
    """

    table: str = ""
    query: str = ""
    split: str = ""
    password_file: str = ""

    def given(self) -> list[str]:
        """The flags set, as the user typed them (for "does not apply" messages)."""
        names = {"table": "--table", "query": "--query", "split": "--split", "password_file": "--db-password-file"}
        return [flag for attr, flag in names.items() if getattr(self, attr)]

    def refuse_any(self, location: str, kind: str) -> None:
        """Raise SiloError when any flag is set: a `kind` (a file, a folder of files) takes none of them."""
        if self.given():
            raise SiloError(f"{', '.join(self.given())} apply to a database URL or a saved dataset, but --data "
                            f"{location!r} is {kind}; drop them.")


class DataSource(ABC):
    """Rows with named columns.

    `what` names the source in error messages ("silo file 's.csv'", "table 'a' of
    postgresql://u@h/db") and `describe()` in logs; neither ever holds a credential.
    """

    #: one phrase naming the source for error messages
    what: str = "data source"

    @property
    @abstractmethod
    def columns(self) -> list[str]:
        """The column names, in source order (may read a header or a schema, never the rows)."""

    @property
    def num_rows(self) -> int | None:
        """Rows when cheaply known (a Parquet footer, a table count); None when only a full read would tell."""
        return None

    def column_type(self, column: str) -> pa.DataType | None:
        """The Arrow type the source declares for `column`, or None when values are read as text (CSV)."""
        return None

    @abstractmethod
    def iter_batches(self, columns: Sequence[str] | None = None,
                     batch_size: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Yield the rows of `columns` (default: all) in order, as RecordBatches of at most `batch_size` rows.

        Raises SiloError for a column the source does not have or rows it cannot parse.
        """

    @abstractmethod
    def describe(self) -> str:
        """One line for logs: the kind of source and where it is, without credentials."""

    def identity(self) -> str:
        """Where the rows are, stable while their content changes (names the source's entries in the silo cache)."""
        return self.describe()

    def cache_key(self) -> str | None:
        """A string that changes whenever the rows may have changed (a file's path, size and mtime).

        None when no cheap key exists (a database): a converted copy is then never
        reused, the source is read again on every load.
        """
        return None

    def size_bytes(self) -> int | None:
        """Bytes the rows take at rest (decides in-memory vs. memory-mapped reading); None when unknown."""
        return None

    @property
    def cache_stem(self) -> str:
        """A short, filesystem-safe name for this source's files in the silo cache."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.what)[:40] or "source"

    def selected(self, columns: Sequence[str] | None) -> list[str]:
        """`columns` (default: all) without repeats; SiloError naming the ones this source lacks."""
        cols = list(dict.fromkeys(columns or self.columns))
        missing = [c for c in cols if c not in self.columns]
        if missing:
            raise SiloError(f"{self.what} has no column(s) {missing}; its columns are {self.columns}.")
        return cols

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
