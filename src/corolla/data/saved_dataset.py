"""The saved-dataset connector: a Hugging Face dataset written with `save_to_disk`.

A folder with `dataset_info.json` and `state.json` is one Dataset; one with
`dataset_dict.json` is a DatasetDict whose split is chosen with `--split` (default
`train`). `datasets.load_from_disk` memory-maps the Arrow files, so reading is
bounded in memory. A `ClassLabel` column is read as its class *names*, so a dataset
labelled with its own id order still lines up with the run's `labels`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from corolla.data.errors import SiloError
from corolla.data.source import DEFAULT_BATCH_ROWS, DataSource, SourceOptions, is_url

DEFAULT_SPLIT = "train"


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file())


class SavedDatasetSource(DataSource):
    """One split of a dataset saved with `save_to_disk`."""

    @classmethod
    def accepts(cls, location: str) -> bool:
        """A local folder holding a saved Dataset or DatasetDict."""
        return not is_url(location) and Path(location).is_dir() and is_saved_dataset(Path(location))

    @classmethod
    def open(cls, location: str, options: SourceOptions) -> SavedDatasetSource:
        """Load the dataset (memory-mapped) and pick its split."""
        extra = [f for f in options.given() if f != "--split"]
        if extra:
            raise SiloError(f"{', '.join(extra)} apply to a database URL, but --data {location!r} is a saved Hugging "
                            "Face dataset; drop them.")
        return cls(location, options.split)

    def __init__(self, folder: str | Path, split: str = "") -> None:
        import datasets

        self.folder = Path(folder)
        try:
            loaded = datasets.load_from_disk(str(self.folder))
        except Exception as e:  # a damaged or foreign folder: datasets raises several types
            raise SiloError(f"the saved dataset {str(self.folder)!r} could not be loaded ({str(e)[:200]}); write it "
                            "again with `Dataset.save_to_disk`.") from e
        if isinstance(loaded, datasets.DatasetDict):
            self.split = split or DEFAULT_SPLIT
            if self.split not in loaded:
                raise SiloError(f"the saved dataset {self.folder.name!r} has no split {self.split!r}; its splits are "
                                f"{sorted(loaded)}: pass --split with one of them.")
            self.ds = loaded[self.split]
        else:
            if split:
                raise SiloError(f"--split {split!r}: the saved dataset {self.folder.name!r} is one Dataset without "
                                "splits; drop --split.")
            self.split, self.ds = "", loaded
        where = f" (split {self.split})" if self.split else ""
        self.what = f"saved dataset {self.folder.name!r}{where}"

    @property
    def columns(self) -> list[str]:
        """The dataset's columns."""
        return list(self.ds.column_names)

    @property
    def num_rows(self) -> int:
        """Rows of the split."""
        return len(self.ds)

    def column_type(self, column: str) -> pa.DataType | None:
        """The Arrow type; a ClassLabel column reads as its names (strings)."""
        if column not in self.ds.column_names:
            return None
        if self._class_names(column) is not None:
            return pa.string()
        return self.ds.data.schema.field(column).type

    def _class_names(self, column: str) -> list[str] | None:
        import datasets

        feature = self.ds.features.get(column)
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def iter_batches(self, columns: Sequence[str] | None = None,
                     batch_size: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Batches of the memory-mapped table (ClassLabel ids turned into their names)."""
        cols = self.selected(columns)
        names = {c: pa.array(n, pa.string()) for c in cols if (n := self._class_names(c)) is not None}
        for table in self.ds.select_columns(cols).with_format("arrow").iter(batch_size=batch_size):
            for batch in table.to_batches(max_chunksize=batch_size):
                if names:
                    arrays = [pc.take(names[c], batch.column(c)) if c in names else batch.column(c) for c in cols]
                    batch = pa.RecordBatch.from_arrays(arrays, names=cols)
                yield batch

    def describe(self) -> str:
        """`saved dataset /abs/dir split train (1,234 rows)`."""
        where = f" split {self.split}" if self.split else ""
        return f"saved dataset {self.folder.resolve()}{where} ({len(self.ds):,} rows)"

    def identity(self) -> str:
        """The folder's absolute path and the split."""
        return f"{self.folder.resolve()}|{self.split}"

    def size_bytes(self) -> int:
        """Bytes of the split's Arrow data."""
        return int(self.ds.data.nbytes)

    def cache_key(self) -> str:
        """The dataset's fingerprint (changes when the saved dataset is rewritten)."""
        return f"{self.folder.resolve()}|{self.split}|{self.ds._fingerprint}"

    @property
    def cache_stem(self) -> str:
        """The folder's name and split."""
        return f"{self.folder.name}{'_' + self.split if self.split else ''}"
