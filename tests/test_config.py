import dataclasses
import tomllib
from pathlib import Path

import pytest

from corolla.config import ConfigError, RunConfig, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_app_bundle_declares_every_key_once_and_carries_nothing_else(tmp_path):
    """The app `flwr run` submits is generated from RunConfig: Flower accepts it, and its bundle is one file."""
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    from corolla.launch.app_bundle import write_app

    (tmp_path / "app").mkdir()
    app = write_app(tmp_path / "app")
    conf = tomllib.loads((app / "pyproject.toml").read_text())
    assert validate_config(conf)[0], validate_config(conf)
    assert conf["tool"]["flwr"]["app"]["config"] == RunConfig().to_mapping()
    assert "flwr" not in tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {})  # declared once
    with zipfile.ZipFile(__import__("io").BytesIO(build_fab_from_disk(app))) as fab:
        assert sorted(n for n in fab.namelist() if not n.startswith(".info/")) == ["pyproject.toml"]
    (app / "silo.jsonl").write_text("{}")
    with pytest.raises(FileExistsError, match="holds silo.jsonl: the app folder must hold only pyproject.toml"):
        write_app(app)


def test_from_mapping_coerces_strings():
    cfg = RunConfig.from_mapping({"num-rounds": "3", "lr": "0.01", "rslora": "true", "aggregation": "fedhl"})
    assert (cfg.num_rounds, cfg.lr, cfg.rslora, cfg.aggregation) == (3, 0.01, True, "fedhl")


@pytest.mark.parametrize(
    "values,match",
    [
        ({"num-round": 3}, r"unknown configuration key\(s\) \['num-round'\]; valid keys are: .*num-rounds"),
        ({"aggregation": "fedsgd"},
         r"`aggregation` = 'fedsgd' is not valid; choose one of \['auto', 'fedavg', 'fedhl', 'ffa', 'fedsvd', 'hetlora', "
         r"'flexlora', 'flora', 'fedmedian', 'fedtrimmedavg'\]"),
        ({"num-rounds": "three"}, "`num-rounds` = 'three' is not a valid int"),
        ({"num-rounds": 2.5}, "`num-rounds` = 2.5 is not a valid int"),
        ({"num-rounds": 0}, "`num-rounds` = 0 is too small; it must be >= 1"),
        ({"lr": 0}, "`lr` = 0.0 must be > 0"),
        ({"labels": "cat,dog", "evaluation": "server"}, "own classes, which have no built-in test split; set `test-data`"),
        ({"labels": "cat", "test-data": "t.csv"}, "holds one class; a classifier needs at least two"),
        ({"server-optimizer": "fedavgm", "server-momentum": 1}, r"`server-momentum` must be in \[0, 1\), got 1.0"),
        ({"server-optimizer": "adam"}, r"`server-optimizer` = 'adam' is not valid; choose one of \['sgd', 'fedavgm', "
                                       r"'fedadam', 'fedyogi'\]"),
        ({"dataset": "imagenet"}, r"`dataset` = .imagenet. is not a corpus of task text-classification; choose one of "
                                  r"\[.bbc., .wordnet.\]"),
        ({"task": "image-classification", "model": "minilm"},
         r"`model` = 'minilm' is not a model of task image-classification; choose one of \['cnn'\]"),
        ({"task": "image-classification", "model": "./my-model"}, "trains only its built-in model"),
        ({"task": "image-classification", "model": "cnn", "dataset": "fashion-mnist", "checkpoint-every": 2},
         r"`checkpoint-every` writes peft adapters, but task image-classification trains its whole model .* set "
         r"checkpoint-every=0"),
        ({"checkpoint-every": -1}, "`checkpoint-every` = -1 is too small; it must be >= 0"),
        ({"lora-dtype": "int8"}, r"`lora-dtype` = 'int8' is not valid; choose one of \['auto', 'float32', 'bfloat16'\]"),
        ({"rslora": "maybe"}, "`rslora` = 'maybe' is not a valid bool"),
        ({"lora-rank": 64}, "exceeds `max-rank`"),
        # replace-style aggregators shrink the model under async weights that do not sum to 1
        ({"mode": "async", "aggregation": "hetlora"},
         r"`aggregation` = 'hetlora' cannot run with mode=async: .* choose one of \['auto', 'fedavg', 'fedhl', 'flora', "
         r"'fedmedian', 'fedtrimmedavg'\]"),
        ({"mode": "async", "async-rule": "fedfix", "aggregation": "flexlora"},
         r"`aggregation` = 'flexlora' cannot run with mode=async: .*\['auto', 'fedavg', 'fedhl', 'flora', 'fedmedian',"
         r" 'fedtrimmedavg'\]"),
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
    from corolla.client.trainer import auto_rank
    from corolla.config.fleet import simulated_rank

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
    from corolla.server.factory import resolve_aggregation

    assert resolve_aggregation(RunConfig(), [4, 4]) == ("fedavg", 4)  # auto: the rank every joined node agrees on
    assert resolve_aggregation(RunConfig.from_mapping({"aggregation": "fedavg"}), [4, 4]) == ("fedavg", 8)  # lora-rank
    assert resolve_aggregation(RunConfig(), [2, 8]) == ("fedhl", 32)
    assert resolve_aggregation(RunConfig.from_mapping({"aggregation": "flora", "max-rank": 16}), [2]) == ("flora", 16)


@pytest.mark.parametrize("ranks,expected", [([], "fedavg"), ([8], "fedavg"), ([4, 4, 4], "fedavg"), ([0, 0], "fedavg"),
                                            ([2, 8], "fedhl"), ([4, 4, 16], "fedhl")])
def test_auto_aggregation_resolves_to_one_name_everywhere(tmp_path, ranks, expected):
    """`auto` means one thing to config validation, the server factory and the report (one rule, one place)."""
    from corolla.server.factory import resolve_aggregation
    from corolla.server.records import RunRecorder
    from corolla.server.report import write_report
    from corolla.server.status import run_status
    from corolla.strategies.registry import resolve_aggregation as rule

    cfg = RunConfig(out_dir=str(tmp_path))
    assert rule("auto", ranks) == expected
    assert expected in cfg.aggregation_candidates()  # validation checks the keys of what auto may become
    if 0 not in ranks:
        assert resolve_aggregation(cfg, ranks)[0] == expected
    recorder = RunRecorder(tmp_path, cfg.to_json())
    recorder.finish(aggregation=expected)  # what Federation.finish writes: the built aggregator's name
    assert write_report(tmp_path).read_text().startswith(f"# corolla run report — {expected} · ")
    assert f"aggregation {expected} · " in run_status(tmp_path)


def test_auto_aggregation_candidates_drive_validation():
    """Keys of either aggregator auto may become are read; keys of neither are refused; a named choice is itself."""
    assert RunConfig().aggregation_candidates() == ("fedavg", "fedhl")
    assert RunConfig(aggregation="flora").aggregation_candidates() == ("flora",)
    RunConfig.from_mapping({"fedhl-weighting": "examples"})  # auto may resolve to fedhl: read
    with pytest.raises(ConfigError, match="would be ignored"):
        RunConfig.from_mapping({"trim-fraction": 0.3})  # fedtrimmedavg's key: auto never becomes it
    with pytest.raises(ValueError, match="auto has no config"):
        RunConfig().component_config("aggregation")
    assert RunConfig().component_config("aggregation", "fedhl").weighting == "relative"


@pytest.mark.parametrize(
    "values,match",
    [
        # keys the chosen mode never reads
        ({"clients-per-round": 3, "mode": "async"}, r"`clients-per-round` = 3 would be ignored: it applies only with "
                                                    r"mode=sync \(this run has mode=async\)"),
        ({"concurrency": 8}, r"`concurrency` = 8 would be ignored: it applies only with mode=async"),
        ({"buffer-size": 4}, r"`buffer-size` = 4 would be ignored: .*async-rule=fedbuff"),
        # FedFix has no staleness weight
        ({"mode": "async", "async-rule": "fedfix", "staleness-exponent": 1.0},
         r"`staleness-exponent` = 1.0 would be ignored: async-rule=fedfix does not weight updates by staleness"),
        ({"mode": "async", "async-rule": "fedfix", "staleness": "hinge"}, "`staleness` = 'hinge' would be ignored"),
        ({"mode": "async", "async-rule": "fedfix", "buffer-size": 3}, "`buffer-size` = 3 would be ignored"),
        # component keys of components not chosen
        ({"server-momentum": 0.5}, r"it configures server-optimizer=fedavgm, and this run chooses none of them"),
        ({"aggregation": "fedavg", "fedhl-weighting": "examples"}, "configures aggregation=fedhl"),
        ({"aggregation": "fedavg", "max-rank": 16}, "`max-rank` = 16 would be ignored"),
        ({"mode": "async", "async-rule": "fedasync", "interval": 5.0}, "configures async-rule=fedfix"),
    ],
)
def test_keys_the_configuration_never_reads_are_refused(values, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(values)


@pytest.mark.parametrize("values", [
    {"mode": "async", "async-rule": "fedfix", "interval": 5.0, "max-staleness": 3},
    {"mode": "async", "async-rule": "fedasync", "staleness": "hinge"},
    {"aggregation": "auto", "fedhl-weighting": "relative", "max-rank": 16},  # auto may resolve to fedhl
    {"server-optimizer": "fedyogi", "server-lr": 0.05, "server-beta1": 0.8, "server-tau": 0.01},
    {"mode": "async", "concurrency": 8, "buffer-size": 4, "eval-interval": 5.0},
    {"mode": "async", "aggregation": "flora"},
    {"mode": "async", "async-rule": "fedfix", "aggregation": "fedhl"},
    {"aggregation": "hetlora"},  # replace-style aggregators are fine in sync rounds (weights sum to 1)
    {"aggregation": "flexlora"},
])
def test_keys_the_configuration_reads_are_accepted(values):
    RunConfig.from_mapping(values)


def test_choices_help_and_defaults_come_from_the_registries():
    from corolla.strategies import AGGREGATORS, ASYNC_RULES, SELECTORS, SERVER_OPTIMIZERS, STALENESS
    from corolla.strategies.fedbuff import FedBuffConfig
    from corolla.strategies.fedhl import FedHLConfig

    meta = {f.name: f.metadata for f in dataclasses.fields(RunConfig)}
    assert meta["aggregation"]["choices"] == ("auto", *AGGREGATORS.names())
    assert meta["selector"]["choices"] == SELECTORS.names()
    assert meta["async_rule"]["choices"] == ASYNC_RULES.names()
    assert meta["staleness"]["choices"] == STALENESS.names()
    assert meta["server_optimizer"]["choices"] == SERVER_OPTIMIZERS.names()
    fedhl = {f.name: f for f in dataclasses.fields(FedHLConfig)}
    assert meta["fedhl_weighting"]["help"] == fedhl["weighting"].metadata["help"]
    assert RunConfig().fedhl_weighting == fedhl["weighting"].default
    assert RunConfig().buffer_size == FedBuffConfig().buffer_size
    cfg = RunConfig.from_mapping({"mode": "async", "buffer-size": 5, "max-staleness": 2})
    assert cfg.component_config("async-rule") == FedBuffConfig(buffer_size=5, max_staleness=2)


def test_simulation_only_keys_are_refused_for_real_nodes():
    RunConfig().check_deployment()
    cfg = RunConfig.from_mapping({"ranks": "4,8", "dirichlet-alpha": 0.1, "num-rounds": 3, "lora-rank": 4})
    assert cfg.simulation_only_keys() == ["ranks", "dirichlet-alpha"]  # lora-rank also sets FedAvg's global rank
    with pytest.raises(ConfigError, match=r"\['ranks', 'dirichlet-alpha'\] describe a simulated fleet .* "
                                          r"`corolla client --rank`"):
        cfg.check_deployment()


def test_lora_spec_is_owned_by_the_configuration():
    from corolla.spec import LoraSpec

    cfg = RunConfig.from_mapping({"lora-alpha": 8, "rslora": "true", "lora-target-modules": "query, key,value"})
    spec = cfg.lora_spec()
    assert spec == LoraSpec(alpha=8.0, rslora=True, target_modules=("query", "key", "value"), dtype="auto")
    assert spec.scale(4) == pytest.approx(8 / 2)
    assert LoraSpec.from_record(spec.to_record()) == spec
    with pytest.raises(ValueError, match="carries no LoRA specification field 'lora-dtype'"):
        LoraSpec.from_record({"lora-alpha": 1.0, "lora-rslora": False, "lora-target-modules": ""})
