"""The folder connector: a folder of CSV/JSONL/Parquet files read as one silo, rows concatenated.

For a site that keeps its data as monthly exports. The files are read in name order
and must share their columns. (In `corolla sim --data DIR` a folder means one
simulated silo per file instead: corolla.data.simulated.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from corolla.data.cache import cache_hash
from corolla.data.errors import SiloError
from corolla.data.files import SILO_FORMATS, FileSource
from corolla.data.source import DEFAULT_BATCH_ROWS, DataSource, SourceOptions, is_url


def silo_files(folder: str | Path) -> list[Path]:
    """The silo files of a folder, sorted by name; SiloError when it holds none."""
    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in SILO_FORMATS
                   and not p.name.startswith("."))
    if not files:
        seen = sorted(p.name for p in root.iterdir())[:5]
        raise SiloError(f"the data folder {str(root)!r} holds no silo files ({', '.join(sorted(SILO_FORMATS))}; "
                        f"found {seen or 'nothing'}); put one CSV, JSONL or Parquet file per silo there.")
    return files


def check_schemas(files: list[Path]) -> list[str]:
    """The columns every silo file shares; SiloError naming two files whose columns differ."""
    first = FileSource(files[0]).columns
    for f in files[1:]:
        cols = FileSource(f).columns
        if set(cols) != set(first):
            raise SiloError(f"silo files have mixed schemas: {files[0].name} has columns {first} but {f.name} has "
                            f"{cols}; give every silo file in the folder the same columns.")
    return first


class FolderSource(DataSource):
    """Every silo file of a folder, in name order, as one source."""

    @classmethod
    def accepts(cls, location: str) -> bool:
        """A local folder (a saved Hugging Face dataset is claimed first by its own connector)."""
        return not is_url(location) and Path(location).is_dir()

    @classmethod
    def open(cls, location: str, options: SourceOptions) -> FolderSource:
        """Check the folder holds silo files of one schema."""
        options.refuse_any(location, "a folder of files")
        return cls(location)

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = [FileSource(f) for f in silo_files(self.folder)]
        self._columns = check_schemas([f.path for f in self.files])
        self.what = f"silo folder {self.folder.name!r}"

    @property
    def columns(self) -> list[str]:
        """The columns the files share."""
        return self._columns

    def column_type(self, column: str) -> pa.DataType | None:
        """Declared only when every file declares the same type (Parquet files)."""
        types = {f.column_type(column) for f in self.files}
        return types.pop() if len(types) == 1 else None

    def iter_batches(self, columns: Sequence[str] | None = None,
                     batch_size: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Each file's rows in turn."""
        for f in self.files:
            yield from f.iter_batches(columns, batch_size)

    def describe(self) -> str:
        """`folder /abs/dir (3 files, 1.2 MiB)`."""
        return f"folder {self.folder.resolve()} ({len(self.files)} files, {self.size_bytes() / 2**20:.1f} MiB)"

    def identity(self) -> str:
        """The folder's absolute path."""
        return str(self.folder.resolve())

    def size_bytes(self) -> int:
        """The files' total size."""
        return sum(f.size_bytes() for f in self.files)

    def cache_key(self) -> str:
        """Every file's key: a file added, removed or rewritten gives a new key."""
        return cache_hash(*(f.cache_key() for f in self.files))

    @property
    def cache_stem(self) -> str:
        """The folder's name."""
        return self.folder.name or "folder"
