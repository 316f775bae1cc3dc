import dataclasses
import tomllib
from pathlib import Path

import pytest

from server.config import ConfigError, RunConfig, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_table_matches_runconfig_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig().to_mapping()


def test_from_mapping_coerces_strings():
    cfg = RunConfig.from_mapping({"num-rounds": "3", "lr": "0.01", "rslora": "true", "aggregation": "fedhl"})
    assert (cfg.num_rounds, cfg.lr, cfg.rslora, cfg.aggregation) == (3, 0.01, True, "fedhl")


@pytest.mark.parametrize(
    "values,match",
    [
        ({"num-round": 3}, r"unknown configuration key\(s\) \['num-round'\]; valid keys are: .*num-rounds"),
        ({"aggregation": "fedsgd"},
         r"`aggregation` = 'fedsgd' is not valid; choose one of \['auto', 'fedavg', 'fedhl', 'hetlora', 'flexlora', 'flora'\]"),
        ({"num-rounds": "three"}, "`num-rounds` = 'three' is not a valid int"),
        ({"num-rounds": 2.5}, "`num-rounds` = 2.5 is not a valid int"),
        ({"num-rounds": 0}, "`num-rounds` = 0 is too small; it must be >= 1"),
        ({"lr": 0}, "`lr` = 0.0 must be > 0"),
        ({"labels": "cat,dog"}, "`labels` names your own classes, which have no built-in test split; set `test-data`"),
        ({"labels": "cat", "test-data": "t.csv"}, "holds one class; a classifier needs at least two"),
        ({"server-momentum": 1}, r"`server-momentum` = 1.0 must be below 1 \(0 turns momentum off\)"),
        ({"dataset": "imagenet"}, r"`dataset` = .imagenet. is not valid; choose one of \[.bbc., .wordnet., .fashion-mnist.\]"),
        ({"rslora": "maybe"}, "`rslora` = 'maybe' is not a valid bool"),
        ({"lora-rank": 64}, "exceeds `max-rank`"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(values, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(values)


def test_round_trip_and_every_field_documented():
    cfg = RunConfig.from_mapping({"num-rounds": 7})
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    assert all(f.metadata.get("help") for f in dataclasses.fields(RunConfig))


def test_parse_overrides():
    assert parse_overrides(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["oops"])


def test_rank_mix_assignment():
    from server.ranks import auto_rank, simulated_rank

    cfg = RunConfig.from_mapping({"ranks": "2,4,8", "max-rank": 8})
    assert [simulated_rank(cfg, p) for p in range(6)] == [2, 4, 8, 2, 4, 8]
    rnd = RunConfig.from_mapping({"ranks": "2,4,8", "max-rank": 8, "rank-assignment": "random", "seed": 3})
    draws = [simulated_rank(rnd, p) for p in range(60)]
    assert draws == [simulated_rank(rnd, p) for p in range(60)] and set(draws) == {2, 4, 8}
    assert simulated_rank(RunConfig(), 5) == 8
    with pytest.raises(ConfigError, match="outside 1..8"):
        RunConfig.from_mapping({"ranks": "2,16", "max-rank": 8})
    with pytest.raises(ConfigError, match="comma-separated"):
        RunConfig.from_mapping({"ranks": "2,x"}).rank_list()
    assert auto_rank("cpu", 64 * 2**30) == 4
    assert [auto_rank("cuda:0", g * 2**30) for g in (8, 16, 24, 48, 80)] == [4, 8, 16, 32, 64]


def test_resolve_aggregation():
    from server.federation import resolve_aggregation

    assert resolve_aggregation(RunConfig(), [4, 4]) == ("fedavg", 4)
    assert resolve_aggregation(RunConfig(), [2, 8]) == ("fedhl", 32)
    assert resolve_aggregation(RunConfig.from_mapping({"aggregation": "flora", "max-rank": 16}), [2]) == ("flora", 16)
