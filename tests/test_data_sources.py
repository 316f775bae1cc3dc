"""The data-source seam: registry dispatch, folder and saved-dataset connectors, the CLI's --data forms."""

from __future__ import annotations

import datasets
import pandas as pd
import pytest

from corolla.data.errors import SiloError
from corolla.data.files import FileSource
from corolla.data.folder import FolderSource
from corolla.data.instructions import load_instructions
from corolla.data.labelled import load_labelled
from corolla.data.registry import CONNECTORS, open_source
from corolla.data.saved_dataset import SavedDatasetSource
from corolla.data.silo import BBC_LABELS
from corolla.data.source import SourceOptions, is_url, normalize_location


def test_locations_go_to_their_connector(tmp_path):
    f = tmp_path / "s.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["tech", "sport"]}).to_csv(f, index=False)
    assert isinstance(open_source(str(f)), FileSource)
    assert isinstance(open_source(str(tmp_path)), FolderSource)
    datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(str(tmp_path / "hf"))
    assert isinstance(open_source(str(tmp_path / "hf")), SavedDatasetSource)
    assert len(CONNECTORS) == 4  # one line per connector
    with pytest.raises(SiloError, match="does not exist; pass --data"):
        open_source(str(tmp_path / "nope.csv"))
    with pytest.raises(SiloError, match="--split apply to a database URL or a saved dataset, but --data .* is a file"):
        open_source(str(f), SourceOptions(split="train"))


def test_the_cli_resolves_paths_but_never_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_location("silos") == str(tmp_path / "silos")
    for url in ("postgresql://alice@db:5432/clinic", "sqlite:///rel/path.db", "postgresql+psycopg://h/db"):
        assert is_url(url) and normalize_location(url) == url
    from corolla.cli import _config, build_parser

    args = build_parser().parse_args(["sim", "--out", str(tmp_path / "run"), "--data", "postgresql://alice@db/clinic",
                                      "--table", "a,b", "--db-password-file", "/run/secrets/pw"])
    cfg = _config(args)
    assert (cfg.sim_data, cfg.sim_table, cfg.sim_password_file) == ("postgresql://alice@db/clinic", "a,b",
                                                                     "/run/secrets/pw")
    client = build_parser().parse_args(["client", "--superlink", "127.0.0.1:9092", "--data", "sqlite:///x.db",
                                        "--query", "SELECT text, label FROM t", "--split", "", "--db-password-file", "f"])
    assert (client.data, client.query, client.db_password_file) == ("sqlite:///x.db", "SELECT text, label FROM t", "f")


def test_a_folder_is_one_silo_of_all_its_files(tmp_path):
    pd.DataFrame({"text": ["a", "b"], "label": ["tech", "sport"]}).to_csv(tmp_path / "2024-01.csv", index=False)
    pd.DataFrame({"text": ["c"], "label": [0]}).to_json(tmp_path / "2024-02.jsonl", orient="records", lines=True)
    ds = load_labelled(open_source(str(tmp_path)), BBC_LABELS, cache_dir=tmp_path / "cache")
    assert ds["text"] == ["a", "b", "c"] and ds["label"] == [4, 3, 0]
    pd.DataFrame({"body": ["d"], "label": [0]}).to_csv(tmp_path / "2024-03.csv", index=False)
    with pytest.raises(SiloError, match="mixed schemas"):
        open_source(str(tmp_path))


def test_a_saved_dataset_and_its_splits(tmp_path):
    names = ["sport", "tech"]  # the dataset's own class order differs from the run's: names line up, not ids
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 1]}, features=feats),
        "test": datasets.Dataset.from_dict({"text": ["d"], "label": [0]}, features=feats)})
    dd.save_to_disk(str(tmp_path / "dd"))
    src = open_source(str(tmp_path / "dd"))
    assert src.num_rows == 3 and src.what == "saved dataset 'dd' (split train)"
    ds = load_labelled(src, BBC_LABELS, cache_dir=tmp_path / "c")
    assert ds["label"] == [3, 4, 4]
    assert len(load_labelled(open_source(str(tmp_path / "dd"), SourceOptions(split="test")), BBC_LABELS)) == 1
    with pytest.raises(SiloError, match=r"has no split 'validation'; its splits are \['test', 'train'\]: pass --split"):
        open_source(str(tmp_path / "dd"), SourceOptions(split="validation"))
    with pytest.raises(SiloError, match="--table apply to a database URL"):
        open_source(str(tmp_path / "dd"), SourceOptions(table="x"))
    datasets.Dataset.from_dict({"text": [1.5], "label": ["tech"]}).save_to_disk(str(tmp_path / "num"))
    with pytest.raises(SiloError, match="column `text` holds double values, not text"):
        load_labelled(open_source(str(tmp_path / "num")), BBC_LABELS)
    chats = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]]})
    chats.save_to_disk(str(tmp_path / "chat"))
    ds = load_instructions(open_source(str(tmp_path / "chat")), cache_dir=tmp_path / "c")
    assert ds[0] == {"prompt": [{"role": "user", "content": "hi"}], "response": "hello"}
