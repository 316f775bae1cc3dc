"""The silo cache: a source too large for memory becomes one memory-mapped Arrow file.

A task's rows (validated text + label ids, or prompt + response) are produced batch
by batch from a `DataSource`. Up to IN_MEMORY_MAX_BYTES they stay in memory; above,
they are written to `<silo cache>/<name>-<hash>-<hash>.arrow` and the returned
Dataset memory-maps that file, so memory stays bounded whatever the source's size.
A source with a cache key (a file: path, size, mtime) reuses its entry until the
key changes; a source without one (a database) is read again on every load.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from corolla.data.errors import SiloError

log = logging.getLogger(__name__)

#: a source up to this size is read into memory (as fast as a pandas read); a larger one is streamed in
#: chunks into an Arrow file in the silo cache and memory-mapped, so memory does not grow with the source
IN_MEMORY_MAX_BYTES = 32 * 2**20
#: overrides the silo cache folder (as `--cache-dir` does)
CACHE_ENV = "COROLLA_CACHE_DIR"
#: bump when the cached layout changes, so old cache files are not reused
CACHE_VERSION = "1"


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


def private_dir(folder: Path) -> Path:
    """Create `folder` (and parents) and make it 0700: cached silo copies are readable by their owner alone."""
    folder.mkdir(parents=True, exist_ok=True)
    if folder.stat().st_uid == os.getuid():
        os.chmod(folder, 0o700)
    return folder


def cached_silos(cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The cached silo copies (Arrow files) in the cache folder, oldest first."""
    folder = silo_cache_dir(cache_dir)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.arrow"), key=lambda p: p.stat().st_mtime)


def clear_cache(cache_dir: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """Remove every cached silo copy (and leftovers of interrupted conversions); return (files, bytes) removed."""
    folder = silo_cache_dir(cache_dir)
    files = [*cached_silos(cache_dir), *(folder.glob(".*.tmp") if folder.is_dir() else [])]
    size = 0
    for f in files:
        size += f.stat().st_size
        f.unlink(missing_ok=True)
    return len(files), size


def cache_hash(*parts: object) -> str:
    """A short stable hash of `parts` (cache file names)."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:10]


def materialize(batches: Callable[[], Iterator[pa.RecordBatch]], schema: pa.Schema, info: datasets.DatasetInfo,
                target: Path, size: int | None, reusable: bool, name: str,
                finish: Callable[[], None]) -> datasets.Dataset:
    """The rows of `batches()` as a Dataset: in memory when small, else memory-mapped from `target`.

    `size` (bytes at rest, None when unknown) decides up front; an unknown size is
    read into memory until IN_MEMORY_MAX_BYTES, then spilled to `target`. `reusable`:
    `target` is keyed by the source's content, so an existing one is used unread.
    `finish` raises SiloError for checks over all rows (no rows, empty texts); a
    failed read leaves no cache file behind.
    """
    if size is not None and size <= IN_MEMORY_MAX_BYTES:
        table = pa.Table.from_batches(list(batches()), schema=schema)
        finish()
        return datasets.Dataset(InMemoryTable(table), info=info)
    if reusable and target.is_file():
        return datasets.Dataset.from_file(str(target), info=info)
    it = batches()
    head: list[pa.RecordBatch] = []
    if size is None:  # unknown size (a query): keep rows in memory until they pass the limit
        held = 0
        for batch in it:
            head.append(batch)
            held += batch.nbytes
            if held > IN_MEMORY_MAX_BYTES:
                break
        else:
            finish()
            return datasets.Dataset(InMemoryTable(pa.Table.from_batches(head, schema=schema)), info=info)
    _write(_chain(head, it), schema, target, size, name, finish)
    return datasets.Dataset.from_file(str(target), info=info)


def _chain(head: list[pa.RecordBatch], rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield from head
    yield from rest


def _write(batches: Iterator[pa.RecordBatch], schema: pa.Schema, target: Path, size: int | None, name: str,
           finish: Callable[[], None]) -> None:
    """Write `batches` into `target` (a temporary name first, renamed once `finish` passed)."""
    folder = target.parent
    try:
        private_dir(folder)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise SiloError(f"cannot use the silo cache folder {str(folder)!r} ({e}); pass --cache-dir (or set "
                        f"{CACHE_ENV}) to a writable folder.") from e
    if size is not None and free < size * 1.1:
        raise SiloError(f"silo {name} ({size / 2**30:.2f} GiB) is converted to Arrow in {str(folder)!r}, "
                        f"which has only {free / 2**30:.2f} GiB free; pass --cache-dir (or set {CACHE_ENV}) to a folder "
                        "with at least the silo's size free.")
    log.info("streaming silo %s into the Arrow cache %s", name, target)
    started = time.perf_counter()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    rows = 0
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # a copy of the silo: its owner's alone
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
        finish()
        os.replace(tmp, target)
        log.info("silo %s: %d rows converted in %.1f s", name, rows, time.perf_counter() - started)
    except OSError as e:
        raise SiloError(f"cannot write the silo cache {str(tmp)!r} ({e}); pass --cache-dir (or set {CACHE_ENV}) to a "
                        "writable folder with at least the silo's size free.") from e
    finally:
        tmp.unlink(missing_ok=True)
    stem = target.name.rsplit("-", 1)[0]  # earlier versions of the same source and columns: stale, remove
    for old in folder.glob(f"{glob.escape(stem)}-*.arrow"):
        if old != target:
            old.unlink(missing_ok=True)


def cache_target(stem: str, source_key: str, content_key: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """`<silo cache>/<stem>-<hash of where and which columns>-<hash of content and labels>.arrow`."""
    return silo_cache_dir(cache_dir) / f"{stem}-{cache_hash(source_key)}-{cache_hash(CACHE_VERSION, content_key)}.arrow"
