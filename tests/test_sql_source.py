"""The SQL connector against a real PostgreSQL (tests/pg.py) and SQLite: rows, streaming, read-only, one-line errors."""

from __future__ import annotations

import sqlite3

import pandas as pd
import pytest

from corolla.data import labelled
from corolla.data.errors import SiloError
from corolla.data.instructions import load_instructions
from corolla.data.labelled import load_labelled
from corolla.data.registry import open_source
from corolla.data.silo import BBC_LABELS
from corolla.data.source import SourceOptions
from corolla.data.sql import PASSWORD_ENV, SqlSource

ROWS = pd.DataFrame({"text": [f"story {i} about {BBC_LABELS[i % 5]}" for i in range(50)],
                     "label": [BBC_LABELS[i % 5] for i in range(50)],
                     "site": ["a" if i < 20 else "b" for i in range(50)]})


@pytest.fixture(scope="module")
def pg(postgres):
    """The session's server with this module's tables."""
    postgres.table("silo", ROWS)
    postgres.table("ids", pd.DataFrame({"text": ["x", "y"], "label": [1, 4]}))
    postgres.table("floats", pd.DataFrame({"text": ["x", "y"], "label": [1.0, 4.5]}))
    postgres.table("numbers", pd.DataFrame({"text": [1, 2], "label": ["tech", "sport"]}))
    postgres.table("chat", pd.DataFrame({"prompt": ["2+2?", "Capital of France?"], "response": ["4", "Paris"]}))
    return postgres


def table(pg, name: str, **kw) -> SqlSource:
    return open_source(pg.url(), SourceOptions(table=name, **kw))


def test_a_table_reads_as_labelled_text_streamed_in_bounded_batches(pg, db_password, tmp_path):
    src = table(pg, "silo")
    assert src.columns == ["text", "label", "site"] and src.num_rows == 50
    batches = list(src.iter_batches(["text", "label"], batch_size=16))
    assert [b.num_rows for b in batches] == [16, 16, 16, 2]  # a server-side cursor, 16 rows a fetch
    ds = load_labelled(src, BBC_LABELS, cache_dir=tmp_path)
    assert ds["label"] == [i % 5 for i in range(50)] and ds["text"][3] == ROWS["text"][3]
    assert load_labelled(table(pg, "ids"), BBC_LABELS, cache_dir=tmp_path)["label"] == [1, 4]
    assert "s3cret" not in src.describe() and src.describe().startswith("postgresql database postgresql+psycopg://")


def test_a_query_and_a_large_result_spilled_to_the_memory_mapped_cache(pg, db_password, tmp_path, monkeypatch):
    q = open_source(pg.url(), SourceOptions(query="SELECT text, label FROM silo WHERE site = 'b' ORDER BY text"))
    assert q.num_rows is None and q.columns == ["text", "label"]
    small = load_labelled(q, BBC_LABELS, cache_dir=tmp_path)
    assert len(small) == 30 and not small.cache_files
    from corolla.data import cache

    monkeypatch.setattr(cache, "IN_MEMORY_MAX_BYTES", 100)  # a size nobody knows ahead: spilled past the limit
    monkeypatch.setattr(labelled, "BATCH_ROWS", 4)
    big = load_labelled(q, BBC_LABELS, cache_dir=tmp_path / "c")
    [f] = big.cache_files
    assert f["filename"].startswith(str(tmp_path / "c")) and big["text"] == small["text"]


def test_instruction_rows_from_a_table(pg, db_password, tmp_path):
    ds = load_instructions(table(pg, "chat"), cache_dir=tmp_path)
    assert ds["response"] == ["4", "Paris"] and ds["prompt"][0] == "2+2?"


def test_the_password_comes_from_the_environment_or_a_file_never_the_url(pg, monkeypatch, tmp_path):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(SiloError, match=f"cannot reach the database .*password .*{PASSWORD_ENV}") as e:
        table(pg, "silo")
    assert "\n" not in str(e.value)
    secret = tmp_path / "pw"
    secret.write_text(pg_password() + "\n")
    assert table(pg, "silo", password_file=str(secret)).num_rows == 50
    url = pg.url().replace("silo_reader@", f"silo_reader:{pg_password()}@")
    with pytest.raises(SiloError, match=f"embeds a password; .* set {PASSWORD_ENV} or pass --db-password-file") as e:
        open_source(url, SourceOptions(table="silo"))
    assert pg_password() not in str(e.value) and "***" in str(e.value)


def pg_password() -> str:
    from tests.pg import PASSWORD

    return PASSWORD


@pytest.mark.parametrize("opts,match", [
    ({"table": "nowhere"}, r"table 'nowhere' of postgresql\+psycopg://silo_reader@127.0.0.1:\d+/corolla_test does not "
                           r"exist \(tables there: \[.*'silo'.*\]\); pass --table"),
    ({}, "pass --table NAME or --query"),
    ({"table": "silo", "query": "SELECT 1"}, "both given"),
    ({"table": "silo", "split": "train"}, "--split selects a split of a saved dataset"),
])
def test_bad_options_stop_with_one_line(pg, db_password, opts, match):
    with pytest.raises(SiloError, match=match) as e:
        open_source(pg.url(), SourceOptions(**opts))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,kw,match", [
    ("silo", {"label_column": "cls"}, r"has no column\(s\) \['cls'\]; its columns are \['text', 'label', 'site'\]. "
                                      "Set --text-column / --label-column"),
    ("floats", {}, "column `label` holds double values, but classes are names or integer ids"),
    ("numbers", {}, "column `text` holds int64 values, not text"),
])
def test_missing_columns_and_wrong_types(pg, db_password, tmp_path, name, kw, match):
    with pytest.raises(SiloError, match=match):
        load_labelled(table(pg, name), BBC_LABELS, cache_dir=tmp_path, **kw)


def test_a_query_without_rows_or_of_the_wrong_types(pg, db_password, tmp_path):
    empty = open_source(pg.url(), SourceOptions(query="SELECT text, label FROM silo WHERE site = 'nowhere'"))
    with pytest.raises(SiloError, match=r"the --query on postgresql\+psycopg://.* has no rows; a client needs"):
        load_labelled(empty, BBC_LABELS, cache_dir=tmp_path)
    floats = open_source(pg.url(), SourceOptions(query="SELECT text, random() AS label FROM silo"))
    with pytest.raises(SiloError, match="column `label` holds double values"):
        load_labelled(floats, BBC_LABELS, cache_dir=tmp_path)
    bad = open_source(pg.url(), SourceOptions(query="SELECT text, nope FROM silo"))
    with pytest.raises(SiloError, match='failed: column "nope" does not exist'):
        bad.columns  # noqa: B018


def test_an_unreachable_database(db_password):
    from corolla.launch.processes import free_port

    with pytest.raises(SiloError, match=r"cannot reach the database postgresql\+psycopg://u@127.0.0.1:\d+/db \(.*\); "
                                        "check the host, port"):
        open_source(f"postgresql://u@127.0.0.1:{free_port()}/db", SourceOptions(table="t"))


@pytest.mark.parametrize("query", [
    "DELETE FROM silo",
    "SELECT 1; DELETE FROM silo",
    "WITH d AS (DELETE FROM silo RETURNING text, label) SELECT text, label FROM d",
    "SELECT text, label FROM silo FOR UPDATE",
    "SELECT nextval('s') AS text, 'tech' AS label",
])
def test_a_writing_query_is_refused_or_fails_and_the_table_is_unchanged(pg, db_password, tmp_path, query):
    import sqlalchemy as sa

    with pg.owner().begin() as conn:
        conn.execute(sa.text("CREATE SEQUENCE IF NOT EXISTS s"))
    with pytest.raises(SiloError):
        src = open_source(pg.url(), SourceOptions(query=query))
        load_labelled(src, BBC_LABELS, cache_dir=tmp_path)
    with pg.owner().connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM silo")).scalar() == 50
        assert conn.execute(sa.text("SELECT last_value FROM s")).scalar() == 1  # never advanced


# ---- SQLite (in addition, not instead) ----------------------------------------------------------
@pytest.fixture
def sqlite_db(tmp_path):
    path = tmp_path / "silos.db"
    with sqlite3.connect(path) as conn:
        ROWS.to_sql("silo", conn, index=False)
        conn.execute("CREATE TABLE mixed (text TEXT, label)")
        conn.executemany("INSERT INTO mixed VALUES (?, ?)", [("a", 3), ("b", "tech"), ("c", "0")])
    return path


def test_sqlite_table_query_and_dynamic_types(sqlite_db, tmp_path):
    src = open_source(f"sqlite:///{sqlite_db}", SourceOptions(table="silo"))
    assert src.num_rows == 50 and src.describe() == f"sqlite database sqlite:///{sqlite_db}, table silo"
    assert load_labelled(src, BBC_LABELS, cache_dir=tmp_path)["label"][:3] == [0, 1, 2]
    mixed = open_source(f"sqlite:///{sqlite_db}", SourceOptions(table="mixed"))
    assert load_labelled(mixed, BBC_LABELS, cache_dir=tmp_path)["label"] == [3, 4, 0]  # ids and names, as in a CSV
    q = open_source(f"sqlite:///{sqlite_db}", SourceOptions(query="SELECT text, label FROM silo WHERE site = 'a'"))
    assert len(load_labelled(q, BBC_LABELS, cache_dir=tmp_path)) == 20


def test_sqlite_is_opened_read_only(sqlite_db, tmp_path):
    before = sqlite_db.stat().st_mtime_ns
    with pytest.raises(SiloError, match="must be one SELECT statement"):
        open_source(f"sqlite:///{sqlite_db}", SourceOptions(query="SELECT 1; DROP TABLE silo"))
    writes = open_source(f"sqlite:///{sqlite_db}", SourceOptions(query="WITH d AS (SELECT 1) DELETE FROM silo"))
    with pytest.raises(SiloError, match="failed: attempt to write a readonly database"):
        load_labelled(writes, BBC_LABELS, cache_dir=tmp_path)
    sneaky = open_source(f"sqlite:///{sqlite_db}", SourceOptions(query="SELECT text, label FROM silo"))
    with sneaky.engine.connect() as conn, pytest.raises(Exception, match="readonly|read-only|query_only"):
        conn.exec_driver_sql("DELETE FROM silo")
    assert sqlite_db.stat().st_mtime_ns == before
    with sqlite3.connect(sqlite_db) as conn:
        assert conn.execute("SELECT count(*) FROM silo").fetchone()[0] == 50


def test_sqlite_and_url_errors(sqlite_db, tmp_path):
    with pytest.raises(SiloError, match="the file .* does not exist; give the path of an existing SQLite file"):
        open_source(f"sqlite:///{tmp_path / 'none.db'}", SourceOptions(table="silo"))
    with pytest.raises(SiloError, match=r"table 'nope' of sqlite:///.* does not exist \(tables there: \['mixed', 'silo'\]"):
        open_source(f"sqlite:///{sqlite_db}", SourceOptions(table="nope"))
    with pytest.raises(SiloError, match="unknown URL scheme 'ftp'"):
        open_source("ftp://host/silo.csv")
    with pytest.raises(SiloError, match="--table apply to a database URL or a saved dataset, but --data"):
        open_source(str(sqlite_db.with_suffix(".csv").parent), SourceOptions(table="x"))


def test_simulation_plans_one_silo_per_table(pg, db_password):
    """`corolla sim --data URL --table a,b`: one simulated node per table, read by the reader real clients use."""
    from corolla.data import simulated
    from corolla.data.simulated import SimData
    from corolla.learning.tasks import build_task
    from corolla.spec import TaskSpec

    pg.table("sim_a", ROWS[:20])
    pg.table("sim_b", ROWS[20:])
    task = build_task(TaskSpec(model="tiny-bert", max_length=16))
    sd = SimData(path=pg.url(), table="sim_a,sim_b")
    assert sd.kind == "tables" and simulated.node_count(sd, None) == 2
    plan = simulated.plan(task, sd, 2, 0.5)
    assert (plan.rows, plan.names) == ([20, 30], ["sim_a", "sim_b"]) and "s3cret" not in plan.to_json()
    assert simulated.load_node(task, sd, 1, 2)["text"] == list(ROWS["text"][20:])
    with pytest.raises(SiloError, match="--nodes 3 does not match the 2 tables"):
        simulated.node_count(sd, 3)
    one = SimData(path=pg.url(), table="silo", partition_by="site")  # one table cut by a site column
    assert simulated.plan(task, one, 2, 0.5).rows == [20, 30]
