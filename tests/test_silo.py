import json
import os

import pandas as pd
import pytest

from corolla.data import cache, files
from corolla.data import silo as data
from corolla.data.silo import (
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


@pytest.fixture(params=["memory", "stream"])
def reading(request, tmp_path, monkeypatch):
    """Run a test on both paths: a small file read in memory, and the streamed path large files take."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    if request.param == "stream":
        monkeypatch.setattr(cache, "IN_MEMORY_MAX_BYTES", 0)
        monkeypatch.setattr(files, "STREAM_CHUNK_BYTES", 256)  # several chunks even in a tiny file
    return request.param


@pytest.mark.parametrize("name", ["s.csv", "s.jsonl", "s.parquet"])
def test_loads_every_format_with_names_or_ids(tmp_path, name, reading):
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
def test_bad_silos_get_clear_errors(tmp_path, setup, kwargs, match, reading):
    with pytest.raises(SiloError, match=match):
        load_silo_file(setup(tmp_path), BBC_LABELS, **kwargs)
    assert not list((tmp_path / "cache").glob("*.arrow"))  # nothing half-converted is left to be reused


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
    from corolla.learning.tasks.base import TaskSpec
    from corolla.learning.tasks.text import TextClassification

    f = tmp_path / "s.csv"
    pd.DataFrame({"text": ["a young dog", "a long while"], "label": ["animal", "time"]}).to_csv(f, index=False)
    ds = TextClassification(TaskSpec(dataset="wordnet")).load_silo(files.FileSource(f), "text", "label")
    assert ds["label"] == [2, 25]
    with pytest.raises(SiloError, match="unknown label 'animal'"):
        TextClassification(TaskSpec(dataset="bbc")).load_silo(files.FileSource(f), "text", "label")


def test_own_label_set_has_no_builtin_data_and_its_own_fingerprint():
    from corolla.learning.tasks.base import TaskSpec
    from corolla.learning.tasks.text import TextClassification

    own = TextClassification(TaskSpec(model="tiny-bert", labels=("benign", "malignant")))
    assert own.label_names == ("benign", "malignant")
    with pytest.raises(SiloError, match="no built-in data for them: give each client --data and the server `test-data`"):
        own.builtin_test()
    bbc = TextClassification(TaskSpec(model="tiny-bert"))
    assert own.load_base_model().classifier.out_features == 2
    # same frozen base weights, other classes: the fingerprints differ, so such a node is refused at join
    assert own.fingerprint(own.load_base_model()) != bbc.fingerprint(bbc.load_base_model())
    assert bbc.fingerprint(bbc.load_base_model()) == bbc.fingerprint(bbc.load_base_model())


def big_rows(n: int) -> dict:
    return {"text": [f"story {i} about {BBC_LABELS[i % 5]} " * (1 + i % 7) for i in range(n)],
            "label": [BBC_LABELS[i % 5] if i % 3 else str(i % 5) for i in range(n)]}


@pytest.mark.parametrize("name", ["s.csv", "s.jsonl", "s.parquet"])
def test_streamed_silo_is_memory_mapped_from_the_cache_and_equals_the_in_memory_read(tmp_path, monkeypatch, name):
    p = write(tmp_path, name, big_rows(500))
    small = load_silo_file(p, BBC_LABELS)
    assert not small.cache_files  # a small file stays in memory: no cache
    monkeypatch.setattr(cache, "IN_MEMORY_MAX_BYTES", 0)
    monkeypatch.setattr(files, "STREAM_CHUNK_BYTES", 1000)
    big = load_silo_file(p, BBC_LABELS, cache_dir=tmp_path / "cache")
    [cached] = big.cache_files
    assert cached["filename"].startswith(str(tmp_path / "cache")) and cached["filename"].endswith(".arrow")
    assert big.features == small.features and big["text"] == small["text"] and big["label"] == small["label"]
    assert big["label"][:3] == [0, 1, 2]  # class names and ids alike


def test_cache_is_reused_until_the_file_changes_and_the_silo_folder_is_never_written(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "IN_MEMORY_MAX_BYTES", 0)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    silos = tmp_path / "silos"
    silos.mkdir()
    p = write(silos, "s.csv", big_rows(50))
    silos.chmod(0o555)  # a read-only silo folder (an institution's mount)
    try:
        first = load_silo_file(p, BBC_LABELS).cache_files[0]["filename"]
        mtime = os.stat(first).st_mtime_ns
        assert load_silo_file(p, BBC_LABELS).cache_files[0]["filename"] == first and os.stat(first).st_mtime_ns == mtime
        assert os.listdir(silos) == ["s.csv"]
        silos.chmod(0o755)
        pd.DataFrame({"text": ["only"], "label": ["tech"]}).to_csv(p, index=False)
        os.utime(p, ns=(mtime + 10**9, mtime + 10**9))
        again = load_silo_file(p, BBC_LABELS)
        assert again["text"] == ["only"] and again.cache_files[0]["filename"] != first
        assert [f.name for f in (tmp_path / "cache").glob("*.arrow")] == [os.path.basename(again.cache_files[0]["filename"])]
    finally:
        silos.chmod(0o755)


def test_unwritable_or_full_cache_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "IN_MEMORY_MAX_BYTES", 0)
    p = write(tmp_path, "s.csv", big_rows(10))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SiloError, match="pass --cache-dir"):
        load_silo_file(p, BBC_LABELS, cache_dir=blocker / "cache")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: type("U", (), {"free": 10})())
    with pytest.raises(SiloError, match="has only 0.00 GiB free; pass --cache-dir"):
        load_silo_file(p, BBC_LABELS, cache_dir=tmp_path / "cache")


def test_formats_that_cannot_stream_are_refused_above_the_limit(tmp_path, monkeypatch):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": "a", "label": "tech"}, {"text": "b", "label": 3}]))
    assert load_silo_file(arr, BBC_LABELS)["label"] == [4, 3]  # a small JSON array is read whole
    pq = write(tmp_path, "s.parquet", big_rows(100))
    monkeypatch.setattr(cache, "IN_MEMORY_MAX_BYTES", 0)
    with pytest.raises(SiloError, match=r"one JSON array .* convert it to JSON Lines"):
        load_silo_file(arr, BBC_LABELS, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(files, "PARQUET_MAX_ROW_GROUP_BYTES", 100)
    with pytest.raises(SiloError, match="rewrite it with row groups under"):
        load_silo_file(pq, BBC_LABELS, cache_dir=tmp_path / "cache")


def test_mixed_id_and_name_labels_and_counts_span_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "IN_MEMORY_MAX_BYTES", 0)
    monkeypatch.setattr(files, "STREAM_CHUNK_BYTES", 40)
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 5 if i % 2 else BBC_LABELS[i % 5]}) + "\n"
                         for i in range(40)))
    assert load_silo_file(p, BBC_LABELS, cache_dir=tmp_path / "c")["label"] == [i % 5 for i in range(40)]
    rows = big_rows(60)
    rows["text"] = ["" if i % 20 == 7 else t for i, t in enumerate(rows["text"])]  # one per chunk, in 3 chunks
    monkeypatch.setattr(files, "STREAM_CHUNK_BYTES", 2000)
    with pytest.raises(SiloError, match="3 row"):
        load_silo_file(write(tmp_path, "e.csv", rows), BBC_LABELS, cache_dir=tmp_path / "c")
    with pytest.raises(SiloError, match="a row longer than the 2000-byte read block"):
        load_silo_file(write(tmp_path, "long.csv", {"text": ["x" * 9000], "label": ["tech"]}), BBC_LABELS,
                       cache_dir=tmp_path / "c")


def test_large_set_is_tokenized_per_batch_yet_trains_exactly_like_the_in_memory_one(tmp_path, monkeypatch):
    import torch

    from corolla.client.trainer import data_digest
    from corolla.learning.tasks import text
    from corolla.learning.tasks.base import Encoded, LazyEncoded, TaskSpec
    from corolla.learning.train_loop import AdapterModel, initial_adapter, select_device
    from corolla.spec import LoraSpec

    task = text.TextClassification(TaskSpec(model="tiny-bert", max_length=32))
    monkeypatch.setattr(cache, "IN_MEMORY_MAX_BYTES", 0)
    ds = load_silo_file(write(tmp_path, "s.csv", big_rows(300)), BBC_LABELS, cache_dir=tmp_path / "cache")
    eager = task.encode(ds)
    monkeypatch.setattr(text, "EAGER_MAX_TOKENS", 0)
    lazy = task.encode(ds)
    assert isinstance(eager, Encoded) and isinstance(lazy, LazyEncoded) and len(lazy) == len(eager) == 300
    idx = torch.tensor([299, 0, 5, 5, 150])
    for a, b in zip(eager.batch(idx, torch.device("cpu")), lazy.batch(idx, torch.device("cpu"))):
        assert all(torch.equal(a[k], b[k]) for k in a) if isinstance(a, dict) else torch.equal(a, b)
    assert data_digest(eager) == data_digest(lazy)
    assert [b.tolist() for b in lazy.label_blocks(block=128)] == [eager.labels[i:i + 128].tolist() for i in (0, 128, 256)]
    model, lora = AdapterModel(task, select_device("cpu")), LoraSpec()
    init = initial_adapter(task, 4, lora, seed=0)
    runs = [model.train(init, 4, d, lora=lora, steps=3, batch_size=8, lr=1e-2, seed=7) for d in (eager, lazy)]
    assert all(torch.equal(torch.from_numpy(runs[0][0][k]), torch.from_numpy(runs[1][0][k])) for k in init)
    assert runs[0][1].loss_mean == runs[1][1].loss_mean
    assert model.evaluate(init, 4, eager, lora) == model.evaluate(init, 4, lazy, lora)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "x"))
    assert data.silo_cache_dir() == tmp_path / "x" and data.silo_cache_dir(tmp_path / "y") == tmp_path / "y"
    monkeypatch.delenv(data.CACHE_ENV)
    assert data.silo_cache_dir().name == "corolla-silos"
