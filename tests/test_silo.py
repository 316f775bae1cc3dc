import json

import pandas as pd
import pytest

from client.data import BBC_LABELS, SiloError, builtin_partition, builtin_split, load_silo_file, write_silos


def write(tmp_path, name, rows):
    p = tmp_path / name
    df = pd.DataFrame(rows)
    if name.endswith(".csv"):
        df.to_csv(p, index=False)
    elif name.endswith(".jsonl"):
        df.to_json(p, orient="records", lines=True)
    else:
        df.to_parquet(p)
    return p


@pytest.mark.parametrize("name", ["s.csv", "s.jsonl", "s.parquet"])
def test_loads_every_format_with_names_or_ids(tmp_path, name):
    p = write(tmp_path, name, {"text": ["a b", "c d", "e"], "label": ["tech", "sport", "business"]})
    ds = load_silo_file(p, BBC_LABELS)
    assert ds["label"] == [4, 3, 0] and ds["text"] == ["a b", "c d", "e"]
    p2 = write(tmp_path, "ids_" + name, {"body": ["x", "y"], "y": [1, 2]})
    ds2 = load_silo_file(p2, BBC_LABELS, text_column="body", label_column="y")
    assert ds2["label"] == [1, 2]


@pytest.mark.parametrize(
    "setup,kwargs,match",
    [
        (lambda t: t / "nope.csv", {}, "does not exist; pass --data"),
        (lambda t: (t / "s.txt").write_text("x") and t / "s.txt", {}, "unknown format"),
        (lambda t: write(t, "s.csv", {"body": ["x"], "label": ["tech"]}), {},
         r"no column\(s\) \['text'\]; its columns are \['body', 'label'\]"),
        (lambda t: write(t, "s.csv", {"text": ["x"], "label": ["tech"]}), {"label_column": "cls"}, "--label-column"),
        (lambda t: (t / "e.csv").write_text("text,label\n") and t / "e.csv", {}, "has no rows"),
        (lambda t: write(t, "s.csv", {"text": ["x", "y"], "label": ["tech", "cooking"]}), {}, "unknown label 'cooking'"),
        (lambda t: write(t, "s.csv", {"text": ["x"], "label": [7]}), {}, "unknown label 7"),
        (lambda t: write(t, "s.jsonl", {"text": ["x", None], "label": [1, 2]}), {}, "empty `text`"),
        (lambda t: (t / "b.jsonl").write_text("{not json") and t / "b.jsonl", {}, "could not be parsed"),
    ],
)
def test_bad_silos_get_clear_errors(tmp_path, setup, kwargs, match):
    with pytest.raises(SiloError, match=match):
        load_silo_file(setup(tmp_path), BBC_LABELS, **kwargs)


def test_builtin_split_and_partitions_are_disjoint_and_reproducible(tmp_path):
    train, test = builtin_split()
    assert len(train) + len(test) == 2225 and len(test) == 445
    assert train.features["label"].names == list(BBC_LABELS)
    parts = [builtin_partition(i, 4, 0.5) for i in range(4)]
    assert sum(len(p) for p in parts) == len(train)
    assert builtin_partition(1, 4, 0.5)["text"] == parts[1]["text"]
    with pytest.raises(SiloError, match="outside 0..3"):
        builtin_partition(4, 4, 0.5)
    paths = write_silos(tmp_path, 2, 0.5, fmt="jsonl")
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert rows and set(r["label"] for r in rows) <= set(BBC_LABELS)
    assert len(load_silo_file(paths[0], BBC_LABELS)) == len(builtin_partition(0, 2, 0.5))
