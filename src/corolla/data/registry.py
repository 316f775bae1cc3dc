"""`--data` string → connector: the one list of connectors.

Adding a connector is one file (a `DataSource` subclass with `accepts` and `open`
classmethods) plus one line here. The first connector whose `accepts` says yes opens
the location; order matters (a saved dataset is a folder too, so it comes first).
Connectors are named by import path and imported on use, so asking for a file never
imports a database driver.
"""

from __future__ import annotations

import importlib

from corolla.data.errors import SiloError
from corolla.data.source import DataSource, SourceOptions, is_url

#: "module:Class", tried in order
CONNECTORS: tuple[str, ...] = (
    "corolla.data.sql:SqlSource",  # postgresql://user@host:port/db, sqlite:///path.db, any SQLAlchemy URL
    "corolla.data.saved_dataset:SavedDatasetSource",  # a folder written by datasets' save_to_disk
    "corolla.data.folder:FolderSource",  # a folder of CSV/JSONL/Parquet files, rows concatenated
    "corolla.data.files:FileSource",  # one CSV/JSONL/Parquet file
)


def connector(target: str) -> type[DataSource]:
    """Import one connector class from its `module:Class` name."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def open_source(location: str, options: SourceOptions | None = None) -> DataSource:
    """Open `--data LOCATION` with the first connector that accepts it; SiloError (one line) when none does."""
    options = options or SourceOptions()
    if not location:
        raise SiloError("--data is empty; give a file, a folder, a saved Hugging Face dataset or a database URL.")
    for target in CONNECTORS:
        cls = connector(target)
        if cls.accepts(location):
            return cls.open(location, options)
    if is_url(location):
        scheme = location.split("://", 1)[0]
        raise SiloError(f"--data has the unknown URL scheme {scheme!r}; use a database URL SQLAlchemy knows "
                        "(postgresql://user@host:port/db, sqlite:///path.db), or a local file or folder.")
    raise SiloError(f"--data {location!r} does not exist; pass --data with the path of a CSV, JSONL or Parquet file, "
                    "a folder of them, a saved Hugging Face dataset, or a database URL.")
