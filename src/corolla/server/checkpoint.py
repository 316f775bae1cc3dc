"""Checkpoints: everything the server needs to continue a run, written atomically after every aggregation.

A checkpoint is one pickle of the server's state — the aggregator (global model,
server-optimizer slots, FedHL's SVD cache), the selector (its statistics and RNG),
the asynchronous rule (its buffer of received, not yet applied updates), the
recorder's counters and the line count of every record file — plus a manifest
holding its SHA-256. Writes go to a temporary file and are renamed into place,
so a crash leaves the previous checkpoint whole; a truncated or altered file is
refused by its checksum, never half-loaded.

The pickle is written and read only by the server itself, in its own run
directory: never resume from a checkpoint you did not write (pickle runs code).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

CHECKPOINT = "checkpoint.pkl"
MANIFEST = "checkpoint.json"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or from another run; the message names the problem and the fix."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Write `state` as the run's checkpoint (pickle, then a manifest with its checksum); return the manifest."""
    blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    manifest = {"format": FORMAT, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                "version": state.get("version"), "round": state.get("round"), "offsets": state.get("offsets", {})}
    _atomic_write(run_dir / CHECKPOINT, blob)
    _atomic_write(run_dir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def load(run_dir: Path) -> dict[str, Any]:
    """Read and verify the run's checkpoint; raise CheckpointError naming the problem and the fix."""
    blob_path, manifest_path = run_dir / CHECKPOINT, run_dir / MANIFEST
    if not blob_path.is_file() or not manifest_path.is_file():
        raise CheckpointError(f"{run_dir} holds no checkpoint ({CHECKPOINT} + {MANIFEST}); a run writes one after "
                              "its first aggregation — start it again without --resume")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({e}); the checkpoint cannot be trusted: "
                              "start the run again with --overwrite") from None
    blob = blob_path.read_bytes()
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')!r}, this corolla reads {FORMAT}; "
                              "resume with the corolla version that wrote it")
    if len(blob) != manifest.get("bytes") or hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
        raise CheckpointError(f"{blob_path} does not match its checksum in {MANIFEST} (truncated or altered: "
                              f"{len(blob)} bytes, {manifest.get('bytes')} expected); nothing was loaded — start the run "
                              "again with --overwrite")
    try:
        state = pickle.loads(blob)  # noqa: S301 - written by this server into its own run directory
    except Exception as e:  # a pickle that passed its checksum but cannot load: another corolla version
        raise CheckpointError(f"{blob_path} cannot be loaded ({type(e).__name__}: {e}); resume with the corolla "
                              "version that wrote it") from None
    return state


def line_counts(run_dir: Path, names: tuple[str, ...]) -> dict[str, int]:
    """Complete lines in each record file (the offsets a resume truncates back to)."""
    out = {}
    for name in names:
        p = run_dir / name
        out[name] = p.read_bytes().count(b"\n") if p.exists() else 0
    return out


def truncate_records(run_dir: Path, offsets: dict[str, int]) -> dict[str, int]:
    """Cut each record file back to its checkpointed line count; return how many lines each lost.

    Rows written after the last checkpoint describe work the resumed server redoes
    (a round not yet aggregated, replies to jobs that are gone), so they go; a torn
    last line from the crash goes with them.
    """
    dropped = {}
    for name, keep in offsets.items():
        p = run_dir / name
        if not p.exists():
            continue
        *complete, torn = p.read_bytes().split(b"\n")  # `torn` is b"" unless the crash cut the last line
        dropped[name] = max(len(complete) - keep, 0) + (torn != b"")
        _atomic_write(p, b"".join(line + b"\n" for line in complete[:keep]))
    return dropped
