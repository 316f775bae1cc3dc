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
        ({"aggregation": "fedsgd"}, r"`aggregation` = 'fedsgd' is not valid; choose one of \['fedavg', 'fedhl'\]"),
        ({"num-rounds": "three"}, "`num-rounds` = 'three' is not a valid int"),
        ({"num-rounds": 2.5}, "`num-rounds` = 2.5 is not a valid int"),
        ({"num-rounds": 0}, "`num-rounds` = 0 is too small; it must be >= 1"),
        ({"lr": 0}, "`lr` = 0.0 must be > 0"),
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
