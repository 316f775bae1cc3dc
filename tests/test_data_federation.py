"""Real federations over loopback whose silos are not files: PostgreSQL tables, and saved Hugging Face datasets.

Each client is a `corolla client` process (trainer + SuperNode) reading its silo through
the data-source seam. Over PostgreSQL the server evaluates on its own test file; over saved
datasets it holds no test data and never loads the model: the sites evaluate on their
held-out rows (or, for one site, its own --eval-data). The tiny BERT, about a minute each
on two cores.
"""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest

from corolla.launch import processes as launch
from corolla.server.records import read_jsonl
from tests.conftest import processes
from tests.test_deployment import start_client, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

LABELS = ("urgent", "routine", "admin")
WORDS = {"urgent": "chest pain severe bleeding now", "routine": "annual checkup follow up visit",
         "admin": "invoice billing address form"}


def rows(n: int, site: str, offset: int) -> pd.DataFrame:
    """A site's notes with its own label mix (the label order shifts per site)."""
    labels = [LABELS[(i + offset) % 3] if i % 4 else LABELS[offset] for i in range(n)]
    return pd.DataFrame({"note": [f"{WORDS[lb]} case {i} at {site}" for i, lb in enumerate(labels)], "label": labels})


def run(tmp_path, silos: list[list[str]], sizes: list[int], server_test_data: bool = True, **more: object) -> None:
    """A one-round FedAvg federation of `corolla client --data ...` processes; checks every silo trained."""
    out, fleet = tmp_path / "run", f"127.0.0.1:{launch.free_port()}"
    n = len(silos)
    sets = {"model": "tiny-bert", "num-rounds": 1, "clients-per-round": n, "min-nodes": n, "local-steps": 1,
            "max-length": 16, "labels": ",".join(LABELS), "text-column": "note", "round-timeout": 240, **more}
    if server_test_data:
        sets["test-data"] = tmp_path / "test.csv"
        rows(12, "server", 0).to_csv(sets["test-data"], index=False)
    with processes() as procs:
        server = start_server(procs, tmp_path, out, fleet, sets)
        for i, data in enumerate(silos):
            start_client(procs, tmp_path, i, fleet, None, 4, *data, "--labels", ",".join(LABELS),
                         "--text-column", "note", "--max-length", "16")
        stdout, _ = server.communicate(timeout=360)
        logs = "\n".join((tmp_path / f"client{i}.log").read_text()[-1500:] for i in range(n))
        assert server.returncode == 0, stdout.decode()[-3000:] + logs
    assert json.loads((out / "summary.json").read_text())["versions"] == 1
    nodes = [x for x in read_jsonl(out / "nodes.jsonl") if x["status"] == "ok"]
    assert sorted(x["num_examples"] for x in nodes) == sorted(sizes)  # each client trained on its own silo
    updates = read_jsonl(out / "updates.jsonl")
    assert len(updates) == n and all(u["status"] == "accepted" for u in updates)


def test_silos_are_tables_of_a_postgresql_database(tmp_path, postgres, db_password):
    sizes = [30, 24, 18]
    for i, (site, n) in enumerate(zip("abc", sizes, strict=True)):
        postgres.table(f"site_{site}", rows(n, site, i))
    silos = [["--data", postgres.url(), "--table", f"site_{site}"] for site in "ab"]
    # the third site selects its rows with a query, its password read from a file instead of the environment
    pw = tmp_path / "pw"
    pw.write_text(db_password)
    silos.append(["--data", postgres.url(), "--query", "SELECT note, label FROM site_c ORDER BY note",
                  "--db-password-file", str(pw)])
    run(tmp_path, silos, sizes)
    for i in range(3):  # the logs name the source, never the password
        log = (tmp_path / f"client{i}.log").read_text()
        assert "silo: postgresql database postgresql+psycopg://silo_reader@127.0.0.1" in log
        assert db_password not in log


def test_silos_are_saved_hugging_face_datasets(tmp_path):
    a = datasets.Dataset.from_pandas(rows(20, "a", 0), preserve_index=False)
    a.save_to_disk(str(tmp_path / "site_a"))
    feats = datasets.Features({"note": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABELS))})
    b = rows(16, "b", 1).assign(label=lambda d: d["label"].map(LABELS.index))
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(b, features=feats, preserve_index=False),
                          "validation": datasets.Dataset.from_pandas(b[:4], features=feats, preserve_index=False)}
                         ).save_to_disk(str(tmp_path / "site_b"))
    rows(6, "b-eval", 2).to_csv(tmp_path / "b_eval.csv", index=False)
    run(tmp_path, [["--data", str(tmp_path / "site_a")],
                   ["--data", str(tmp_path / "site_b"), "--split", "train", "--eval-data", str(tmp_path / "b_eval.csv")]],
        [20, 16], server_test_data=False, **{"personalize-steps": 2})
    out = tmp_path / "run"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["version"] for m in metrics] == [0, 1]
    for m in metrics:  # site a holds out 10 % of its 20 rows; site b evaluates on its own 6-row file
        assert sorted(r["examples"] for r in m["sites"].values()) == [2, 6]
        assert m["accuracy"] == m["site_accuracy"]
    trained = sorted(u["num_examples"] for u in read_jsonl(out / "updates.jsonl"))
    assert trained == [16, 18]  # b trains on its whole silo, a on what it did not hold out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"] == "sites" and summary["sites_evaluated"] == 2
    assert "## Per site" in (out / "report.md").read_text()
    personal = json.loads((out / "personalization.json").read_text())  # each site fine-tuned its own copy
    assert sorted(personal["sites"]) == sorted(metrics[-1]["sites"])
    assert all(0 <= r["personal_accuracy"] <= 1 for r in personal["sites"].values())
    assert summary["personalization_gap"] == personal["personalization_gap"]
