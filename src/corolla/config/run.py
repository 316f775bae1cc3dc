"""The run configuration: one typed, validated object parsed once and passed down.

Its fields are the `[tool.flwr.app.config]` table of pyproject.toml with
kebab-case keys (tests/test_config.py keeps the two identical). Every bad key or
value raises `ConfigError` naming the key, the problem and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from corolla.modelinfo import DECODER_TYPES, ModelError, is_model_path, read_model_type
from corolla.precision import WIRE_DTYPES
from corolla.spec import AUTO, DEFAULT_TASK, LORA_DTYPES, TASKS, LoraSpec, TaskInfo, TaskSpec, parse_labels, parse_modules
from corolla.strategies.guard import GuardConfig
from corolla.strategies.privacy import DP_AGGREGATIONS, PrivacyConfig
from corolla.strategies.registry import (
    ASYNC_RULES,
    AUTO_AGGREGATION,
    AUTO_MIXED_RANKS,
    AUTO_ONE_RANK,
    REGISTRIES,
    aggregation_candidates,
    component_options,
)

MODES = ("sync", "async")
EXISTING_RUN = ("refuse", "overwrite", "resume")
SPEED_PROFILES = ("none", "tiers", "lognormal")
RANK_ASSIGNMENTS = ("tier", "random")
CLOCKS = ("real", "virtual")
#: where the global model is evaluated: the server's test data, each site's held-out rows, or both
EVALUATIONS = ("auto", "server", "sites", "both")
#: how one file of simulated silos (or the built-in corpus) is cut (flwr-datasets partitioners; data/silo.py)
PARTITIONERS = ("dirichlet", "iid", "pathological")
#: keys that describe the simulated fleet: a deployment's nodes bring their own rank, data and speed
SIMULATION_ONLY = "simulation"


class ConfigError(ValueError):
    """A run-configuration key or value is invalid; the message lists what is valid."""


def _h(text: str, choices: tuple[str, ...] | None = None, low: float | None = None, *,
       when: str | None = None, scope: str | None = None) -> dict[str, Any]:
    """Field metadata: help, valid choices, lower bound, the setting under which the key is read, its scope."""
    return {"help": text, "choices": choices, "low": low, "when": when, "scope": scope}


_OPTIONS = component_options()


def _component(key: str) -> Any:
    """A key owned by components: default, help, bound and choices come from their config dataclasses."""
    o = _OPTIONS[key]
    return field(default=o.default, metadata={"help": o.help, "choices": o.choices, "low": o.low,
                                              "owners": o.owners})


def _guard(key: str, when: str | None = None) -> Any:
    """A key of the server's update guard: default, bound and help come from GuardConfig (strategies/guard.py)."""
    f = next(f for f in dataclasses.fields(GuardConfig) if f.metadata.get("key") == key)
    return field(default=f.default, metadata=_h(f.metadata["help"], low=f.metadata.get("low"), when=when))


def _privacy(key: str, when: str | None = "dp=central") -> Any:
    """A key of differential privacy: default, bound and help come from PrivacyConfig (strategies/privacy.py)."""
    f = next(f for f in dataclasses.fields(PrivacyConfig) if f.metadata.get("key") == key)
    return field(default=f.default, metadata=_h(f.metadata["help"], f.metadata.get("choices"), low=f.metadata.get("low"),
                                                when=when))


def _choice(kind: str, default: str, text: str, extra: tuple[str, ...] = (), when: str | None = None) -> Any:
    """A key that chooses a component: its choices are the registry's names."""
    return field(default=default, metadata=_h(text, (*extra, *REGISTRIES[kind].names()), when=when))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every knob of a run. Field names are the kebab-case keys with `_` for `-`.

    Generic keys are declared here; component keys (e.g. `buffer-size`,
    `fedhl-weighting`) take their default, bound and help from the config dataclass
    of the component that reads them (strategies/registry.py). A key set to a
    non-default value that the chosen mode or components never read is refused.
    """

    task: str = field(default=DEFAULT_TASK, metadata=_h("what is learned", tuple(TASKS)))
    model: str = field(default=AUTO, metadata=_h(
        "base model: a Hugging Face model folder path, or a built-in name (auto: the task's first) — "
        + "; ".join(f"{t.name}: {', '.join(t.models)}" for t in TASKS.values())))
    dataset: str = field(default=AUTO, metadata=_h(
        "built-in corpus for simulation and the test split (auto: the task's first): "
        + "; ".join(f"{t.name}: {', '.join(t.datasets)}" for t in TASKS.values())))
    labels: str = field(default="", metadata=_h("comma-separated class names of your own data (empty: the dataset's)"))
    test_data: str = field(default="", metadata=_h("server-side test file, CSV/JSONL/Parquet (empty: built-in test split)"))
    text_column: str = field(default="text", metadata=_h("text column of test-data"))
    label_column: str = field(default="label", metadata=_h("label column of test-data"))
    max_length: int = field(default=TaskSpec.max_length, metadata=_h("tokens per example", low=8))
    out_dir: str = field(default="runs/latest", metadata=_h("run directory (metrics, report, plots)"))
    existing_run: str = field(default="refuse", metadata=_h(
        "an earlier run in out-dir: refuse, overwrite it, or resume it from its checkpoint (--overwrite/--resume)",
        EXISTING_RUN))
    mode: str = field(default="sync", metadata=_h("driver loop", MODES))
    aggregation: str = _choice("aggregation", AUTO_AGGREGATION, f"aggregation rule ({AUTO_AGGREGATION}: {AUTO_ONE_RANK} "
                               f"at one rank, {AUTO_MIXED_RANKS} for mixed)", extra=(AUTO_AGGREGATION,))
    selector: str = _choice("selector", "random", "client selection")
    server_optimizer: str = _choice("server-optimizer", "sgd", "what the server does with each aggregated change")
    num_rounds: int = field(default=12, metadata=_h("global versions to produce", low=1))
    clients_per_round: int = field(default=6, metadata=_h("clients trained per round", low=1, when="mode=sync"))
    min_nodes: int = field(default=2, metadata=_h("nodes to wait for before the first round", low=1))
    local_steps: int = field(default=10, metadata=_h("optimizer steps per local job", low=1))
    batch_size: int = field(default=16, metadata=_h("examples per local step", low=1))
    lr: float = field(default=3e-3, metadata=_h("client AdamW learning rate", low=0.0))
    # default 1.0 (bench/results/unseen_defaults.md): 0.9 starved the later versions of a 10-version federation on
    # unseen two-class corpora (lr 0.39× by version 9) without removing its version-to-version swings
    lr_decay: float = field(default=1.0, metadata=_h("client lr × lr-decay^version (1: constant); per *version*, so "
                                                     "async runs, with many more versions, want 1.0", low=0.0))
    prox_mu: float = field(default=0.0, metadata=_h("FedProx proximal weight (0: off)", low=0.0))
    lora_rank: int = field(default=8, metadata=_h("LoRA rank of the global adapter under a one-rank rule named in the "
                                                  "configuration (fedavg, fedmedian, fedtrimmedavg), and of simulated "
                                                  "clients without `ranks`", low=1))
    ranks: str = field(default="", metadata=_h("simulated rank mix, e.g. '2,4,8,16,32' (deployment: each node's --rank)",
                                               scope=SIMULATION_ONLY))
    rank_assignment: str = field(default="tier", metadata=_h("how `ranks` map to simulated nodes", RANK_ASSIGNMENTS,
                                                             scope=SIMULATION_ONLY))
    lora_alpha: float = field(default=16.0, metadata=_h("LoRA alpha; scale = alpha / rank (sent with every job)",
                                                        low=0.0))
    rslora: bool = field(default=False, metadata=_h("scale = alpha / sqrt(rank) (sent with every job)"))
    lora_target_modules: str = field(default="", metadata=_h(
        "comma-separated module names LoRA wraps, or all-linear (empty: the task's default)"))
    lora_dtype: str = field(default="auto", metadata=_h(
        "local training compute dtype: auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16 (CUDA)",
        LORA_DTYPES))
    wire_dtype: str = field(default="float32", metadata=_h(
        "dtype adapters travel in, both ways: float32 (exact), float16 or bfloat16 (half the bytes; the server rounds "
        "what it sends first, so updates stay measured against exactly what each node received)", WIRE_DTYPES))
    max_rank: int = _component("max-rank")
    fedhl_weighting: str = _component("fedhl-weighting")
    svd: str = _component("svd")
    fedhl_fold: str = _component("fedhl-fold")
    fedhl_svd_start: str = _component("fedhl-svd-start")
    aggregation_device: str = _component("aggregation-device")
    server_lr: float = _component("server-lr")
    server_momentum: float = _component("server-momentum")
    server_beta1: float = _component("server-beta1")
    server_beta2: float = _component("server-beta2")
    server_tau: float = _component("server-tau")
    trim_fraction: float = _component("trim-fraction")
    max_weight_share: float = _guard("max-weight-share")
    max_update_norm: float = _guard("max-update-norm")
    update_norm_multiple: float = _guard("update-norm-multiple", when="max-update-norm=0.0")
    dp: str = _privacy("dp", when=None)
    dp_noise_multiplier: float = _privacy("dp-noise-multiplier")
    dp_clip: float = _privacy("dp-clip")
    dp_adaptive_clip: bool = _privacy("dp-adaptive-clip")
    dp_target_quantile: float = _privacy("dp-target-quantile", when="dp-adaptive-clip=True")
    dp_clip_lr: float = _privacy("dp-clip-lr", when="dp-adaptive-clip=True")
    dp_delta: float = _privacy("dp-delta", when=None)
    target_epsilon: float = _privacy("target-epsilon")
    dp_sgd_clip: float = _privacy("dp-sgd-clip", when=None)
    dp_sgd_noise_multiplier: float = _privacy("dp-sgd-noise-multiplier", when=None)
    dirichlet_alpha: float = field(default=0.5, metadata=_h("label skew of simulated silos (<= 0: IID)",
                                                            scope=SIMULATION_ONLY))
    sim_data: str = field(default="", metadata=_h(
        "simulated silos from your files: a folder (one silo per CSV/JSONL/Parquet file) or one file, cut by "
        "`partition-by` or `partitioner` (empty: the built-in corpus; `corolla sim --data`); also a saved Hugging "
        "Face dataset or a database URL (`sim-table`)", scope=SIMULATION_ONLY))
    sim_table: str = field(default="", metadata=_h(
        "table(s) of a `sim-data` database URL: several, comma-separated, are one silo each (`corolla sim --table`)",
        scope=SIMULATION_ONLY))
    sim_query: str = field(default="", metadata=_h(
        "one SELECT giving a `sim-data` database's rows, cut like one file (`corolla sim --query`)",
        scope=SIMULATION_ONLY))
    sim_split: str = field(default="", metadata=_h(
        "split of a `sim-data` saved DatasetDict (empty: train; `corolla sim --split`)", scope=SIMULATION_ONLY))
    sim_password_file: str = field(default="", metadata=_h(
        "file holding the `sim-data` database's password (else $COROLLA_DB_PASSWORD; never the password itself)",
        scope=SIMULATION_ONLY))
    partition_by: str = field(default="", metadata=_h(
        "column of the `sim-data` file whose values are the silos, e.g. a site id (one node per value)",
        scope=SIMULATION_ONLY))
    partitioner: str = field(default="dirichlet", metadata=_h(
        "how one `sim-data` file is cut: dirichlet (label skew, `dirichlet-alpha`), iid, pathological "
        "(`classes-per-node` classes per node); the built-in corpus takes dirichlet or iid", PARTITIONERS,
        scope=SIMULATION_ONLY))
    classes_per_node: int = field(default=2, metadata=_h("classes per node of the pathological partitioner", low=1,
                                                         when="partitioner=pathological", scope=SIMULATION_ONLY))
    async_rule: str = _choice("async-rule", "fedbuff", "asynchronous rule", when="mode=async")
    concurrency: int = field(default=4, metadata=_h("clients training at once", low=1, when="mode=async"))
    buffer_size: int = _component("buffer-size")
    staleness: str = _choice("staleness", "polynomial", "staleness weight s(τ) (FedBuff, FedAsync)",
                             when="mode=async")
    staleness_exponent: float = _component("staleness-exponent")
    max_staleness: int = _component("max-staleness")
    interval: float = _component("interval")
    fedfix_weighting: str = _component("fedfix-weighting")
    speed_profile: str = field(default="none", metadata=_h("simulated client speeds", SPEED_PROFILES,
                                                           scope=SIMULATION_ONLY))
    speed_tiers: str = field(default="1,2,5,10", metadata=_h("slowdown factors of the `tiers` profile",
                                                             scope=SIMULATION_ONLY))
    speed_sigma: float = field(default=1.0, metadata=_h("σ of the `lognormal` slowdown profile", low=0.0,
                                                        scope=SIMULATION_ONLY))
    clock: str = field(default="real", metadata=_h(
        "simulation clock: real (Ray; slow clients sleep) or virtual (discrete-event, in-process: each job takes "
        "local-steps × virtual-step-s × its slowdown on a simulated clock); `corolla sim --clock`", CLOCKS,
        scope=SIMULATION_ONLY))
    virtual_step_s: float = field(default=0.05, metadata=_h(
        "simulated seconds per local step of a 1× client (0: measure once, from the first job)", low=0.0,
        when="clock=virtual", scope=SIMULATION_ONLY))
    virtual_jitter: float = field(default=0.0, metadata=_h(
        "σ of a seeded lognormal factor on every simulated job duration (0: none)", low=0.0, when="clock=virtual",
        scope=SIMULATION_ONLY))
    evaluation: str = field(default="auto", metadata=_h(
        "where the global model is evaluated: server (on test-data or the built-in test split; the server loads "
        "the model), sites (each site on its held-out rows; the server never loads the model), both; auto: "
        "server when the run has server test data (test-data, or a built-in corpus), sites with your own labels "
        "and no test-data", EVALUATIONS))
    eval_fraction: float = field(default=0.1, metadata=_h(
        "share of each site's silo held out for site evaluation and never trained on (seeded by the silo's "
        "content: the same rows every round; a site's own --eval-data replaces it)", low=0.0))
    eval_sites: int = field(default=0, metadata=_h(
        "sites asked per evaluation, drawn (seeded) from the usable ones (0: every usable site)", low=0))
    personalize_steps: int = field(default=0, metadata=_h(
        "at the end, each site also fine-tunes the final model for N steps on its own training rows and evaluates "
        "that copy on the same held-out rows: the personalization gap (0: not measured)", low=0))
    eval_every: int = field(default=1, metadata=_h("evaluate the global model every N versions", low=1))
    eval_examples: int = field(default=0, metadata=_h(
        "evaluate on the first N examples of the server's test data and of each site's held-out rows (0: all)", low=0))
    eval_interval: float = field(default=0.0, metadata=_h("evaluate at most every N seconds (0: every eval-every)",
                                                          low=0.0, when="mode=async"))
    checkpoint_every: int = field(default=0, metadata=_h(
        "write the global adapter in peft's format to RUN/adapters/vN every N versions and to RUN/adapter at the end "
        "(0: none; `corolla export` writes one from a finished run)", low=0))
    time_budget: float = field(default=0.0, metadata=_h("stop after this many seconds of training (0: no limit)",
                                                        low=0.0))
    round_timeout: float = field(default=600.0, metadata=_h("seconds to wait for a round's replies", low=1.0))
    seed: int = field(default=0, metadata=_h("seed of every random choice the server makes"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            key = to_key(f.name)
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"`{key}` = {value!r} is not valid; choose one of {list(meta['choices'])}.")
            if meta.get("low") is not None and value < meta["low"]:
                raise ConfigError(f"`{key}` = {value!r} is too small; it must be >= {meta['low']}.")
        if self.lr <= 0:
            raise ConfigError(f"`lr` = {self.lr!r} must be > 0.")
        self._refuse_async_aggregation()
        self._check_sim_data()
        self._check_evaluation()
        self._check_privacy()
        if self.dp_sgd_clip > 0 and self.prox_mu > 0:
            raise ConfigError("DP-SGD (dp-sgd-clip > 0) clips each example's gradient of the loss; the prox-mu term "
                              "would escape the clipping: set prox-mu=0.")
        if self.aggregation == "fedsvd" and self.server_optimizer != "sgd":
            raise ConfigError(f"aggregation=fedsvd re-factorizes B·A every version, so B changes basis each time and "
                              f"server-optimizer={self.server_optimizer}'s memory would mix bases; use server-optimizer=sgd.")
        if len(self.label_tuple()) == 1:
            raise ConfigError(f"`labels` = {self.labels!r} holds one class; a classifier needs at least two.")
        self._check_ranks()
        info = TASKS[self.task]
        self._check_model(info)
        if self.dataset != AUTO and self.dataset not in info.datasets:
            raise ConfigError(f"`dataset` = {self.dataset!r} is not a corpus of task {self.task}; choose one of "
                              f"{list(info.datasets)}.")
        self._check_components()
        self._refuse_unread_keys()

    def _check_components(self) -> None:
        """Build the LoRA spec and every chosen component's config (for `auto`, each aggregator it may become)."""
        try:
            self.lora_spec()
            for kind in REGISTRIES:
                names = self.aggregation_candidates() if kind == "aggregation" else (None,)
                for name in names:
                    self.component_config(kind, name)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check_evaluation(self) -> None:
        """Server evaluation needs test data; site evaluation needs rows to hold out (or each site's own)."""
        if self.eval_fraction >= 1:
            raise ConfigError(f"`eval-fraction` = {self.eval_fraction!r} would hold out the whole silo; choose a share "
                              "below 1 (e.g. 0.1).")
        if self.evaluation in ("server", "both") and self.labels and not self.test_data:
            raise ConfigError(f"`evaluation` = {self.evaluation!r} evaluates on the server, but `labels` names your "
                              "own classes, which have no built-in test split; set `test-data` to a CSV/JSONL/Parquet "
                              "file the server evaluates on, or use evaluation=sites.")
        if self.test_data and not self.evaluates_on_server():
            raise ConfigError(f"`test-data` is read only by server evaluation, and `evaluation` = {self.evaluation!r}; "
                              "drop test-data or use evaluation=both.")

    def privacy(self) -> PrivacyConfig:
        """The run's differential-privacy settings (`dp` off: none)."""
        return PrivacyConfig.from_mapping(self.to_mapping())

    def _check_privacy(self) -> None:
        """Client-level DP is sound only where its analysis holds: sync, uniform sampling, a linear aggregator."""
        try:
            dp = self.privacy()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not dp.enabled:
            return
        if self.mode != "sync":
            raise ConfigError("`dp` = central needs mode=sync: an asynchronous buffer's composition depends on which "
                              "sites are fast, so its sampling rate has no sound accounting here.")
        if self.selector != "random":
            raise ConfigError(f"`dp` = central needs selector=random: {self.selector} picks sites by what they sent "
                              "(losses, durations), so the accountant's uniform subsampling would overstate the privacy.")
        if self.aggregation not in (*DP_AGGREGATIONS, AUTO_AGGREGATION):
            raise ConfigError(f"`dp` = central adds its noise to the average of what sites send, which is the step of "
                              f"{', '.join(DP_AGGREGATIONS)} only; aggregation={self.aggregation} combines them "
                              "non-linearly (products, medians): use one of those.")
        if dp.adaptive_clip and dp.noise_multiplier >= 0.1 * self.clients_per_round:
            raise ConfigError(f"`dp-adaptive-clip` needs clients-per-round > 10 × dp-noise-multiplier "
                              f"({self.clients_per_round} <= 10 × {dp.noise_multiplier:g}): the noised count of "
                              "unclipped updates would take all the noise; raise clients-per-round or drop it.")
        if dp.target_epsilon > 0:
            self._check_budget(dp)

    def _check_budget(self, dp: PrivacyConfig) -> None:
        """Refuse a run whose planned versions would spend more than target-epsilon (sampling at its highest rate)."""
        from corolla.strategies.privacy import Accountant

        q = min(1.0, self.clients_per_round / max(self.min_nodes, 1))
        planned = Accountant(dp.delta).epsilon_after(self.num_rounds, dp.noise_multiplier, q)
        if planned <= dp.target_epsilon:
            return
        fits, acc = 0, Accountant(dp.delta)
        while fits < self.num_rounds and acc.epsilon_after(1, dp.noise_multiplier, q) <= dp.target_epsilon:
            acc.step(dp.noise_multiplier, q)
            fits += 1
        lower = f"lower num-rounds to {fits}, " if fits else "not one version fits; "
        raise ConfigError(f"`target-epsilon` = {dp.target_epsilon:g}: {self.num_rounds} versions at dp-noise-multiplier "
                          f"{dp.noise_multiplier:g} and sampling rate {q:.3g} (clients-per-round / min-nodes) spend "
                          f"ε = {planned:.3g} at δ = {dp.delta:g}; {lower}raise dp-noise-multiplier or target-epsilon, "
                          "or sample fewer sites per round (more min-nodes).")

    def resolved_evaluation(self) -> str:
        """`evaluation` with `auto` resolved: server when the run has server test data, else sites."""
        if self.evaluation != "auto":
            return self.evaluation
        return "server" if self.test_data or not self.labels else "sites"

    def evaluates_on_server(self) -> bool:
        """True when the server evaluates the global model itself (and so must load the base model)."""
        return self.resolved_evaluation() in ("server", "both")

    def evaluates_on_sites(self) -> bool:
        """True when sites evaluate the global model on their held-out rows (which they then never train on)."""
        return self.resolved_evaluation() in ("sites", "both")

    def _check_ranks(self) -> None:
        """Every simulated rank (`lora-rank`, `ranks`) within 1..`max-rank`."""
        if self.lora_rank > self.max_rank:
            raise ConfigError(f"`lora-rank` = {self.lora_rank} exceeds `max-rank` = {self.max_rank}; raise `max-rank`.")
        for r in self.rank_list():
            if not 1 <= r <= self.max_rank:
                raise ConfigError(f"`ranks` holds {r}, outside 1..{self.max_rank} (`max-rank`).")

    def _check_sim_data(self) -> None:
        """`partition-by` and `partitioner` describe how a `sim-data` file is cut."""
        if self.partition_by and not self.sim_data:
            raise ConfigError(f"`partition-by` = {self.partition_by!r} cuts a `sim-data` file; give the file with "
                              "`corolla sim --data FILE` or drop --partition-by.")
        if self.partition_by and self.partitioner != "dirichlet":
            raise ConfigError(f"`partition-by` gives one silo per value of {self.partition_by!r}, so `partitioner` = "
                              f"{self.partitioner!r} would be ignored; drop one of them.")
        given = [k for k in ("sim-table", "sim-query", "sim-split", "sim-password-file") if getattr(self, k.replace("-", "_"))]
        if given and not self.sim_data:
            raise ConfigError(f"`{given[0]}` describes a `sim-data` source; give it with `corolla sim --data` or drop "
                              f"`{given[0]}`.")
        if self.partitioner == "pathological" and not self.sim_data:
            raise ConfigError("`partitioner` = 'pathological' cuts your own file (`corolla sim --data FILE`); the "
                              "built-in corpus takes dirichlet or iid.")

    def _check_model(self, info: TaskInfo) -> None:
        """A built-in name of the task, or a Hugging Face model folder of an architecture the task can train."""
        if self.checkpoint_every and not info.uses_lora:
            raise ConfigError(f"`checkpoint-every` writes peft adapters, but task {self.task} trains its whole model "
                              "(no adapter); set checkpoint-every=0 (the final model is in global.npz).")
        if not is_model_path(self.model):
            if self.model != AUTO and self.model not in info.models:
                raise ConfigError(f"`model` = {self.model!r} is not a model of task {self.task}; choose one of "
                                  f"{list(info.models)}, or give the path of a Hugging Face model folder.")
            return
        if not info.uses_lora:
            lora_tasks = " or ".join(f"task={t.name}" for t in TASKS.values() if t.uses_lora)
            raise ConfigError(f"task {self.task} trains only its built-in model {list(info.models)}; a model folder "
                              f"needs {lora_tasks}.")
        try:
            model_type = read_model_type(self.model)
        except ModelError as e:
            raise ConfigError(str(e)) from None
        if info.generates and model_type not in DECODER_TYPES:
            raise ConfigError(f"`model` = {self.model!r} is a {model_type} encoder, which cannot generate; "
                              f"task={self.task} needs a decoder (Llama, Qwen, Mistral, SmolLM, ...).")

    def _refuse_async_aggregation(self) -> None:
        """Refuse an aggregator that declares it cannot run under asynchronous weights (`supports_async`)."""
        aggregators = REGISTRIES["aggregation"]

        def supports_async(choice: str) -> bool:
            return all(aggregators[n].cls.supports_async for n in aggregation_candidates(choice))

        if self.mode != "async" or supports_async(self.aggregation):
            return
        ok = [n for n in (AUTO_AGGREGATION, *aggregators.names()) if supports_async(n)]
        raise ConfigError(
            f"`aggregation` = {self.aggregation!r} cannot run with mode=async: it replaces the global model with "
            "Σ w_i x_i, and asynchronous weights (staleness, FedFix's d_i) do not sum to 1, so even unchanged "
            f"replies would shrink it; choose one of {ok}, or mode=sync.")

    def _refuse_unread_keys(self) -> None:
        """A key set away from its default that nothing in this configuration reads is an error, not a no-op."""
        for f in dataclasses.fields(self):
            if getattr(self, f.name) == f.default:
                continue
            why = self.unread_reason(to_key(f.name))
            if why:
                raise ConfigError(f"`{to_key(f.name)}` = {getattr(self, f.name)!r} would be ignored: {why}.")

    def unread_reason(self, key: str) -> str | None:
        """Why `key` is not read under this configuration (None: it is read)."""
        meta = {to_key(f.name): f.metadata for f in dataclasses.fields(self)}[key]
        when = meta.get("when")
        if when:
            k, v = when.split("=")
            if str(getattr(self, k.replace("-", "_"))) != v:
                return f"it applies only with {when} (this run has {k}={getattr(self, k.replace('-', '_'))})"
        if key == "dp-delta" and self.dp == "off" and self.dp_sgd_clip == 0:
            return "it is the δ of dp=central and of DP-SGD (dp-sgd-clip > 0), and this run uses neither"
        if key == "dp-sgd-noise-multiplier" and self.dp_sgd_clip == 0:
            return "it applies only with DP-SGD (dp-sgd-clip > 0)"
        if key in ("eval-fraction", "eval-sites", "personalize-steps") and not self.evaluates_on_sites():
            return f"sites evaluate only with evaluation=sites or both (this run evaluates on the {self.resolved_evaluation()})"
        if key in ("staleness", "staleness-exponent") and self.mode == "async":
            rule = ASYNC_RULES[self.async_rule].cls
            if not rule.uses_staleness:
                return f"async-rule={self.async_rule} does not weight updates by staleness; use fedbuff or fedasync"
        owners = meta.get("owners")
        if owners and not any(self._chosen(owner) for owner in owners):
            return f"it configures {', '.join(owners)}, and this run chooses none of them"
        return None

    def _chosen(self, owner: str) -> bool:
        kind, name = owner.split("=")
        chosen = getattr(self, kind.replace("-", "_"))
        if kind in ("async-rule", "staleness") and self.mode != "async":
            return False
        if kind == "staleness" and not ASYNC_RULES[self.async_rule].cls.uses_staleness:
            return False
        if kind == "aggregation":  # auto: either aggregator it may resolve to reads its keys
            return name in self.aggregation_candidates()
        return chosen == name

    def aggregation_candidates(self) -> tuple[str, ...]:
        """The aggregators this run may use: the chosen one, or both that `auto` resolves to by the nodes' ranks."""
        return aggregation_candidates(self.aggregation)

    def component_config(self, kind: str, name: str | None = None) -> Any:
        """The typed config of component `name` of `kind` (default: the run's choice), e.g. FedBuffConfig.

        `aggregation = auto` names no component until the nodes' ranks resolve it
        (`corolla.strategies.registry.resolve_aggregation`): pass the resolved name.
        """
        name = name or getattr(self, kind.replace("-", "_"))
        if kind == "aggregation" and name == AUTO_AGGREGATION:
            raise ValueError("aggregation=auto has no config until the nodes' ranks resolve it; pass the resolved name")
        return REGISTRIES[kind].config(name, self.to_mapping())

    def simulation_only_keys(self) -> list[str]:
        """Keys set away from their defaults that only a simulated fleet reads."""
        return [to_key(f.name) for f in dataclasses.fields(self)
                if f.metadata.get("scope") == SIMULATION_ONLY and getattr(self, f.name) != f.default]

    def check_deployment(self) -> None:
        """Refuse simulation-only keys for a federation of real nodes (each node brings its rank, silo and speed)."""
        keys = self.simulation_only_keys()
        if keys:
            raise ConfigError(f"{keys} describe a simulated fleet and would be ignored by real nodes: set each "
                              "node's rank with `corolla client --rank`, its data with --data; drop these keys.")

    def label_tuple(self) -> tuple[str, ...]:
        """`labels` as a tuple of names (empty: the dataset's own)."""
        return parse_labels(self.labels)

    def rank_list(self) -> list[int]:
        """The simulated rank mix (empty: every node at `lora-rank`)."""
        try:
            return [int(x) for x in self.ranks.replace(" ", "").split(",") if x]
        except ValueError:
            raise ConfigError(f"`ranks` = {self.ranks!r} is not a comma-separated list of integers.") from None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case keys (Flower's run_config or `--set` pairs); strings are coerced."""
        known = {to_key(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown configuration key(s) {unknown}; valid keys are: {', '.join(sorted(known))}.")
        kwargs = {known[k].name: _coerce(k, v, known[k].type) for k, v in values.items()}
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Return kebab-case keys → values (what config.json and `--run-config` hold)."""
        return {to_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Return the resolved configuration as pretty JSON."""
        return json.dumps(self.to_mapping(), indent=2, sort_keys=True)

    def task_spec(self) -> TaskSpec:
        """The part of the configuration the task needs."""
        return TaskSpec(task=self.task, model=self.model, dataset=self.dataset, labels=self.label_tuple(),
                        max_length=self.max_length, seed=self.seed)

    def lora_spec(self) -> LoraSpec:
        """The LoRA specification the server sends with every job."""
        return LoraSpec(alpha=self.lora_alpha, rslora=self.rslora,
                        target_modules=parse_modules(self.lora_target_modules), dtype=self.lora_dtype,
                        wire_dtype=self.wire_dtype)


def to_key(name: str) -> str:
    """Field name → kebab-case configuration key."""
    return name.replace("_", "-")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    typ = {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`{key}` = {value!r} is not a valid {typ.__name__}.") from None


#: named starting points for `--preset`; `--set` overrides any of their keys
PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct instruction-tuned on WordNet definitions split by topic, FedHL over ranks 4-32:
    # sized for 2 CPU cores (about 10 minutes with `corolla sim --nodes 8`)
    "llm": {"task": "causal-lm", "model": "smollm2", "dataset": "wordnet", "max-length": 72, "batch-size": 4,
            "local-steps": 4, "clients-per-round": 4, "num-rounds": 8, "lr": 2e-3, "lr-decay": 1.0,
            "ranks": "4,8,16,32", "eval-examples": 100},
}


def preset(name: str) -> dict[str, Any]:
    """The run-configuration values of preset `name`."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}.") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """Parse `KEY=VALUE` strings from the command line."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE (e.g. --set num-rounds=5).")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out
