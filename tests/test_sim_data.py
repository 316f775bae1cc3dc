"""`corolla sim --data`: simulated silos from the user's own files, planned and checked before the run starts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from corolla.config import ConfigError, RunConfig
from corolla.data import silo as data
from corolla.data import simulated as simdata
from corolla.data.simulated import SimData
from corolla.launch import processes as launch
from corolla.spec import TaskSpec
from tests.conftest import COROLLA, run_sim

pytestmark = pytest.mark.slow  # starts real processes (SuperLink, SuperNodes, trainers, Ray)

LABELS = ("urgent", "routine", "admin")


def _rows(n: int, site: str, offset: int = 0) -> pd.DataFrame:
    words = {"urgent": "chest pain severe bleeding now", "routine": "annual checkup follow up visit",
             "admin": "invoice billing address form"}
    labels = [LABELS[(i + offset) % 3] for i in range(n)]
    return pd.DataFrame({"note": [f"{words[lb]} case {i} at {site}" for i, lb in enumerate(labels)],
                         "label": labels, "site": site})


def write_silo_folder(folder: Path) -> list[Path]:
    """Three silos of the triage classes in three formats, one column set."""
    folder.mkdir(parents=True)
    a, b, c = folder / "a_site.csv", folder / "b_site.jsonl", folder / "c_site.parquet"
    _rows(30, "a").to_csv(a, index=False)
    _rows(24, "b", 1).to_json(b, orient="records", lines=True)
    _rows(18, "c", 2).to_parquet(c)
    (folder / "README.txt").write_text("not a silo")
    return [a, b, c]


def _task(labels: tuple[str, ...] = LABELS):
    from corolla.learning.tasks import build_task

    return build_task(TaskSpec(model="tiny-bert", labels=labels, max_length=16))


def _sd(path: Path, **kw) -> SimData:
    return SimData(path=str(path), text_column="note", **kw)


def test_folder_is_one_silo_per_file_in_name_order(tmp_path):
    files = write_silo_folder(tmp_path / "silos")
    sd = _sd(tmp_path / "silos")
    assert sd.kind == "folder" and simdata.silo_files(sd.path) == files
    assert simdata.node_count(sd, None) == 3
    task = _task()
    plan = simdata.plan(task, sd, 3, 0.5)
    assert (plan.nodes, plan.rows, plan.names) == (3, [30, 24, 18], ["a_site.csv", "b_site.jsonl", "c_site.parquet"])
    assert json.loads(plan.to_json())["silos"][1] == {"partition-id": 1, "silo": "b_site.jsonl", "rows": 24}
    node = simdata.load_node(task, sd, 1, 3)  # what the Ray actor of partition 1 trains on
    assert len(node) == 24 and set(node["label"]) == {0, 1, 2}
    with pytest.raises(data.SiloError, match=r"--nodes 5 does not match the 3 silo files in .*; drop --nodes"):
        simdata.node_count(sd, 5)


def test_bad_folders_stop_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(data.SiloError, match=r"holds no silo files .*found \['notes.txt'\]\); put one CSV, JSONL or "
                                             r"Parquet file per silo there"):
        simdata.node_count(_sd(empty), None)
    mixed = tmp_path / "mixed"
    write_silo_folder(mixed)
    _rows(5, "d").rename(columns={"note": "text"}).to_csv(mixed / "d_site.csv", index=False)
    with pytest.raises(data.SiloError, match=r"mixed schemas: a_site.csv has columns \['note', 'label', 'site'\] but "
                                             r"d_site.csv has \['text', 'label', 'site'\]; give every silo file"):
        simdata.plan(_task(), _sd(mixed), 4, 0.5)
    with pytest.raises(data.SiloError, match="does not exist"):
        simdata.node_count(_sd(tmp_path / "nowhere"), None)


def test_unknown_labels_name_every_label_and_the_fix(tmp_path):
    write_silo_folder(tmp_path / "silos")
    with pytest.raises(data.SiloError, match=r"unknown label 'urgent'.*The silo files hold the labels \['admin', "
                                             r"'routine', 'urgent'\]: for your own classes pass --set "
                                             r"labels=admin,routine,urgent"):
        simdata.plan(_task(()), _sd(tmp_path / "silos"), 3, 0.5)  # BBC's classes


def test_partition_by_a_site_column(tmp_path):
    f = tmp_path / "all.csv"
    pd.concat([_rows(7, "10"), _rows(5, "2"), _rows(9, "x"), _rows(4, "2", 1)]).to_csv(f, index=False)
    sd = _sd(f, partition_by="site")
    assert sd.kind == "column" and simdata.node_count(sd, None) == 3
    task = _task()
    plan = simdata.plan(task, sd, 3, 0.5)
    assert plan.names == ["2", "10", "x"] and plan.rows == [9, 7, 9]  # integers in numeric order, then text
    node = simdata.load_node(task, sd, 0, 3)
    assert len(node) == 9 and all(t.endswith("at 2") for t in node["text"])
    one = tmp_path / "one.csv"
    _rows(6, "a").to_csv(one, index=False)
    with pytest.raises(data.SiloError, match=r"--partition-by 'site' has one value \('a'\) in one.csv: that is one "
                                             r"silo, not a federation; choose a column with a value per site"):
        simdata.node_count(_sd(one, partition_by="site"), None)
    with pytest.raises(data.SiloError, match=r"--partition-by 'ward' is not a column of all.csv"):
        simdata.node_count(_sd(f, partition_by="ward"), None)
    with pytest.raises(data.SiloError, match="drop --nodes"):
        simdata.node_count(sd, 4)


@pytest.mark.parametrize("scheme,alpha,k", [("iid", 0.0, 2), ("dirichlet", 0.5, 2), ("pathological", 0.5, 1)])
def test_one_file_split_by_a_partitioner(tmp_path, scheme, alpha, k):
    f = tmp_path / "all.parquet"
    _rows(90, "a").to_parquet(f)
    sd = _sd(f, partitioner=scheme, alpha=alpha, classes_per_node=k)
    task = _task()
    plan = simdata.plan(task, sd, 6, alpha)
    assert plan.nodes == 6 and sum(plan.rows) == 90 and min(plan.rows) >= 1
    got = [len(simdata.load_node(task, sd, i, 6)) for i in range(6)]
    assert got == plan.rows  # the actors draw the planner's partitions
    if scheme == "pathological":  # one class per node
        assert all(len(set(simdata.load_node(task, sd, i, 6)["label"])) == 1 for i in range(6))


def test_a_split_that_cannot_work_names_the_numbers_and_the_largest_count(tmp_path):
    f = tmp_path / "all.csv"
    _rows(40, "a").to_csv(f, index=False)
    task = _task()
    with pytest.raises(data.PartitionError, match=r"^40 rows cannot be split into 50 IID partitions of at least 1 "
                                                  r"row\(s\) each \(10 node\(s\) would get fewer than 1 row\(s\)\); use "
                                                  r"--nodes 40 or fewer, more data\.$"):
        simdata.plan(task, _sd(f, partitioner="iid"), 50, 0.0)
    with pytest.raises(data.PartitionError, match=r"40 rows cannot be split into 30 Dirichlet\(α=0.1\) partitions .*"
                                                  r"use --nodes \d+ or fewer"):
        simdata.plan(task, _sd(f, alpha=0.1), 30, 0.1)


def test_builtin_corpus_with_too_many_nodes_stops_before_anything_starts(tmp_path):
    """The issue's case: 1,000 nodes on BBC failed inside flwr-datasets and waited out round-timeout (600 s)."""
    out = tmp_path / "run"
    res = subprocess.run([*COROLLA, "sim", "--nodes", "1000", "--out", str(out)], capture_output=True, text=True,
                         env=launch.flower_env(tmp_path / "home"), timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("corolla: the built-in bbc corpus's training split: 1,780 rows cannot be split into "
                                "1,000 Dirichlet(α=0.5) partitions of at least 2 row(s) each")
    assert "use --nodes" in lines[-1] and "IID split (up to 1,780 nodes)" in lines[-1]
    # no SuperLink, no Ray: the check ran before anything started (its cost is wall-clock, not asserted here: 5.8 s
    # idle, 71 s once in CI under a benchmark's load)
    assert not (out / ".flwr").exists() and not (out / "superlink.log").exists()


def test_sim_data_keys_are_checked():
    with pytest.raises(ConfigError, match="`partition-by` = 'site' cuts a `sim-data` file"):
        RunConfig.from_mapping({"partition-by": "site"})
    with pytest.raises(ConfigError, match="`partitioner` = 'iid' would be ignored"):
        RunConfig.from_mapping({"sim-data": "/x.csv", "partition-by": "site", "partitioner": "iid"})
    with pytest.raises(ConfigError, match="pathological' cuts your own file"):
        RunConfig.from_mapping({"partitioner": "pathological"})
    with pytest.raises(ConfigError, match="`classes-per-node` = 3 would be ignored"):
        RunConfig.from_mapping({"sim-data": "/x.csv", "classes-per-node": 3})
    with pytest.raises(ConfigError, match="describe a simulated fleet"):
        RunConfig.from_mapping({"sim-data": "/x.csv"}).check_deployment()


def test_simulation_on_a_folder_of_own_label_silos(tmp_path):
    """A real `corolla sim` (Ray, Flower's engine) on three silo files of a custom label set, one node per file.

    No server test data: the sites evaluate the global model on their held-out rows
    (evaluation auto → sites), and the server never loads the model.
    """
    write_silo_folder(tmp_path / "silos")
    out = tmp_path / "run"
    sets = {"model": "tiny-bert", "labels": ",".join(LABELS), "text-column": "note", "eval-fraction": 0.2,
            "num-rounds": 2, "clients-per-round": 3, "local-steps": 2, "max-length": 16, "min-nodes": 3}
    code, log = run_sim(tmp_path, out, 3, sets, "--data", str(tmp_path / "silos"), "--cpus", "2")
    assert code == 0, log[-3000:]
    assert "3 simulated silos from" in log and "72 rows" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 2 and summary["rejected_updates"] == 0 and summary["evaluation"] == "sites"
    nodes = [n for n in map(json.loads, (out / "nodes.jsonl").read_text().splitlines()) if n["status"] == "ok"]
    assert sorted(n["num_examples"] for n in nodes) == [18, 24, 30]  # one node per file, each its file's rows
    assert all("ray-node=" in n["device"] for n in nodes)
    updates = [json.loads(ln) for ln in (out / "updates.jsonl").read_text().splitlines()]
    assert len(updates) == 6 and all(u["status"] == "accepted" for u in updates)
    assert sorted({u["num_examples"] for u in updates}) == [14, 19, 24]  # 20 % of each silo held out, never trained
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["version"] for m in metrics] == [0, 1, 2]
    for m in metrics:  # every site evaluated every version on its held-out rows
        assert sorted(r["examples"] for r in m["sites"].values()) == [4, 5, 6]
        assert m["accuracy"] == pytest.approx(m["site_accuracy"])
        assert 0 <= m["site_worst_accuracy"] <= m["site_accuracy"] <= 1
    assert summary["final_site_accuracy"] == metrics[-1]["site_accuracy"]
    report = (out / "report.md").read_text()
    assert "## Per site" in report and (out / "sites.png").stat().st_size > 0 and (out / "best.npz").exists()
    status = subprocess.run([*COROLLA, "status", str(out)], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "sites: mean" in status.stdout and "3 evaluated" in status.stdout
    silos = json.loads((out / "silos.json").read_text())
    assert [s["silo"] for s in silos["silos"]] == ["a_site.csv", "b_site.jsonl", "c_site.parquet"]
    assert json.loads((out / "config.json").read_text())["sim-data"] == str((tmp_path / "silos").resolve())


def test_causal_lm_silos_from_a_folder_and_an_iid_split(tmp_path):
    from corolla.learning.tasks import build_task

    folder = tmp_path / "qa"
    folder.mkdir()
    for i, n in enumerate((5, 8)):
        pd.DataFrame({"prompt": [f"Define word {j}." for j in range(n)],
                      "response": [f"meaning {j}" for j in range(n)]}).to_json(folder / f"s{i}.jsonl", orient="records",
                                                                              lines=True)
    task = build_task(TaskSpec(task="causal-lm", model="tiny-llama", max_length=16))
    plan = simdata.plan(task, SimData(path=str(folder)), 2, 0.5)
    assert plan.rows == [5, 8]
    one = folder / "s1.jsonl"
    assert simdata.plan(task, SimData(path=str(one), partitioner="iid"), 3, 0.0).rows == [3, 3, 2]
    with pytest.raises(data.SiloError, match="partitioner=dirichlet splits by label, and task causal-lm has none"):
        simdata.plan(task, SimData(path=str(one)), 3, 0.5)
