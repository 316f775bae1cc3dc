import json

import pandas as pd
import pytest

from corolla.client.data import (
    BBC_LABELS,
    WORDNET_LABELS,
    SiloError,
    _read_wordnet_nouns,
    builtin_partition,
    builtin_split,
    load_silo_file,
    write_silos,
)


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


WORDNET_SAMPLE = """  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 001 ~ 00001930 n 0000 | that which is perceived or known or inferred \
to have its own distinct existence (living or nonliving)
02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; "the dog barked all night"
15122231 28 n 01 time 0 000 | the continuum of experience in which events pass from the future through the present to the past;
"""


def test_wordnet_reader_keeps_definitions_and_lexicographer_labels(tmp_path):
    f = tmp_path / "data.noun"
    f.write_text(WORDNET_SAMPLE)
    texts, labels = _read_wordnet_nouns(f)
    assert texts == [
        "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
        "a member of the genus Canis",
        "the continuum of experience in which events pass from the future through the present to the past",
    ]
    assert [WORDNET_LABELS[i] for i in labels] == ["Tops", "animal", "time"]


def test_missing_wordnet_names_the_package(tmp_path):
    with pytest.raises(SiloError, match="apt-get install wordnet-base"):
        _read_wordnet_nouns(tmp_path / "nope")


def test_wordnet_corpus_split_has_all_26_categories():
    train, test = builtin_split("wordnet")
    assert len(train) + len(test) == 82_115  # every noun synset of WordNet 3.0
    assert train.features["label"].names == list(WORDNET_LABELS) and len(WORDNET_LABELS) == 26
    assert set(test["label"]) == set(range(26))  # stratified: even noun.motive (42 synsets) is in the test split
    part = builtin_partition(3, 20, 0.3, name="wordnet")
    assert len(part) > 0 and set(part["label"]) <= set(range(26))


def test_text_silo_uses_the_configured_corpus_labels(tmp_path):
    from corolla.client.tasks.base import TaskSpec
    from corolla.client.tasks.text import TextClassification

    f = tmp_path / "s.csv"
    pd.DataFrame({"text": ["a young dog", "a long while"], "label": ["animal", "time"]}).to_csv(f, index=False)
    ds = TextClassification(TaskSpec(dataset="wordnet")).load_silo(str(f), "text", "label")
    assert ds["label"] == [2, 25]
    with pytest.raises(SiloError, match="unknown label 'animal'"):
        TextClassification(TaskSpec(dataset="bbc")).load_silo(str(f), "text", "label")


def test_own_label_set_has_no_builtin_data_and_its_own_fingerprint():
    from corolla.client.tasks.base import TaskSpec
    from corolla.client.tasks.text import TextClassification

    own = TextClassification(TaskSpec(model="tiny-bert", labels=("benign", "malignant")))
    assert own.label_names == ("benign", "malignant")
    with pytest.raises(SiloError, match="no built-in data for them: give each client --data and the server `test-data`"):
        own.builtin_test()
    bbc = TextClassification(TaskSpec(model="tiny-bert"))
    assert own.load_base_model().classifier.out_features == 2
    # same frozen base weights, other classes: the fingerprints differ, so such a node is refused at join
    assert own.fingerprint(own.load_base_model()) != bbc.fingerprint(bbc.load_base_model())
    assert bbc.fingerprint(bbc.load_base_model()) == bbc.fingerprint(bbc.load_base_model())
