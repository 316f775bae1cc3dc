"""What corolla leaves on disk is its owner's alone: keys, silo copies, run directories; and it deletes only its own."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pyarrow as pa
import pytest

from corolla import security
from corolla.data import cache
from corolla.learning.export import ExportError, export_adapter
from corolla.server.records import RunRecorder


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def open_umask():
    old = os.umask(0o022)  # what most accounts have: files 0644, folders 0755 unless corolla says otherwise
    yield
    os.umask(old)


def test_private_keys_are_0600_from_the_first_byte_and_never_written_through_a_planted_link(tmp_path, monkeypatch):
    created = []
    real_open = os.open

    def spy(path, flags, mode_=0o777, *a, **k):
        created.append((str(path), flags, mode_))
        return real_open(path, flags, mode_, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    victim = tmp_path / "victim"
    victim.write_text("not yours")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "site1").symlink_to(victim)  # someone planted a link at the key's name
    private, public = security.make_node_key(tmp_path / "keys", "site1", force=True)
    assert victim.read_text() == "not yours" and not private.is_symlink()
    assert mode(private) == 0o600 and private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    [(path, flags, m)] = [c for c in created if "site1" in c[0]]
    assert flags & os.O_EXCL and flags & os.O_CREAT and m == 0o600  # created private, not chmod'ed afterwards
    security.make_ca(tmp_path / "pki", ["127.0.0.1"])
    assert mode(tmp_path / "pki" / "ca.key") == mode(tmp_path / "pki" / "server.key") == 0o600


def test_cached_silo_copies_are_private_and_removable_by_a_command(tmp_path):
    folder = tmp_path / "silo-cache"
    target = folder / "silo-abc-def.arrow"
    schema = pa.schema([("text", pa.string()), ("label", pa.string())])
    batch = pa.RecordBatch.from_pylist([{"text": "a hospital's note", "label": "x"}], schema=schema)
    cache._write(iter([batch]), schema, target, None, "silo.csv", lambda: None)
    assert mode(folder) == 0o700 and mode(target) == 0o600
    env = {**os.environ, cache.CACHE_ENV: str(folder)}
    listed = subprocess.run([sys.executable, "-m", "corolla.cli", "cache", "list"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0 and "silo-abc-def.arrow" in listed.stdout and "1 cached silo copy in" in listed.stdout
    cleared = subprocess.run([sys.executable, "-m", "corolla.cli", "cache", "clear"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert cleared.returncode == 0 and cleared.stdout.startswith("removed 1 cached silo copy")
    assert not target.exists() and cache.cached_silos(folder) == []


def test_run_directories_are_private(tmp_path):
    RunRecorder(tmp_path / "run", "{}")
    assert mode(tmp_path / "run") == 0o700


def test_export_refuses_a_folder_it_did_not_write_and_leaves_it_alone(tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    with pytest.raises(ExportError, match="thesis exists and was not written by `corolla export` .*choose another --out"):
        export_adapter(tmp_path / "no-run", precious)
    assert (precious / "chapter1.tex").read_text() == "years of work"
