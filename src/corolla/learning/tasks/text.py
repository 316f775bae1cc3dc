"""Text classification: an encoder (BERT family) or decoder (Llama family) + LoRA + a trained classification head."""

from __future__ import annotations

import functools
from typing import Any

import datasets
import torch
from peft import LoraConfig
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from corolla.data import silo as data
from corolla.data.labelled import load_labelled
from corolla.data.source import DataSource
from corolla.learning import models
from corolla.learning.tasks.base import Encoded, LazyEncoded, Task
from corolla.spec import LoraSpec, TaskSpec

#: a set is tokenized up front only up to this many tokens (rows × max-length; 8 Mi tokens = 128 MiB of tensors) ...
EAGER_MAX_TOKENS = 8 * 2**20
#: ... and this much text (tokenizing it takes seconds); larger sets are tokenized per batch (LazyEncoded)
EAGER_MAX_TEXT_BYTES = 32 * 2**20
#: rows tokenized per call when encoding up front
ENCODE_CHUNK = 512


class TextClassification(Task):
    """Any local Hugging Face encoder or decoder (or a built-in one) on BBC News, WordNet nouns or a user silo.

    `minilm` (all-MiniLM-L6-v2, inside a package) is the default; `smollm2` is the
    embedded decoder; a folder path takes the user's own model, whose family comes
    from its config: an encoder classifies from its pooled output, a decoder from its
    last token (`AutoModelForSequenceClassification` builds either head). LoRA wraps
    peft's default targets for the architecture unless `lora-target-modules` says
    otherwise; the head is trained in full and averaged. `tiny-bert` is a 2-layer,
    64-wide BERT built from a config with a fixed seed: every process builds
    bit-identical weights without any file, which makes process-level tests fast. It
    shares MiniLM's tokenizer (shipped in the package).
    """

    name = "text-classification"
    #: classification heads of the supported architectures (BERT/RoBERTa `classifier`, DistilBERT's two, decoders' `score`)
    HEADS = ("pre_classifier", "classifier", "score")

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.trained_modules: tuple[str, ...] = ("classifier",)

    @property
    def label_names(self) -> tuple[str, ...]:
        """`labels` when given (the user's own classes), else the built-in corpus's (BBC's 5, WordNet's 26)."""
        if self.spec.labels:
            return self.spec.labels
        try:
            return data.TEXT_LABELS[self.spec.dataset]
        except KeyError:
            raise ValueError(f"dataset {self.spec.dataset!r} is not a text corpus; valid: {sorted(data.TEXT_LABELS)}") from None

    @functools.cached_property
    def source(self) -> models.ModelSource | None:
        """Where the base model lives (None for `tiny-bert`, built from a config)."""
        return None if self.spec.model == "tiny-bert" else models.resolve(self.spec.model)

    @property
    def model_type(self) -> str:
        """The architecture (config.json's `model_type`; "bert" for the built-in tiny model): picks LoRA's defaults."""
        return self.source.model_type if self.source else "bert"

    @functools.cached_property
    def tokenizer(self):  # noqa: ANN201 - transformers' tokenizer type
        """The model's tokenizer (loaded on first use; a pad token added when it has none)."""
        return models.load_tokenizer(self.source.path if self.source else models.minilm_path())

    def load_base_model(self, **from_pretrained: Any) -> nn.Module:
        """Load the model folder with a fresh classification head, or build the seeded tiny BERT."""
        n = len(self.label_names)
        if self.source is None:
            self._no_load_options(from_pretrained, "the tiny test BERT")
            cfg = BertConfig(
                vocab_size=self.tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, max_position_embeddings=512, num_labels=n,
            )
            with torch.random.fork_rng():
                torch.manual_seed(1234)
                model = BertForSequenceClassification(cfg)
        else:
            # a fresh head, drawn from the caller's RNG: the server's seeded initial adapter holds its start (a folder
            # fine-tuned for another label set keeps its body; its head of the wrong size is replaced)
            model = AutoModelForSequenceClassification.from_pretrained(
                self.source.path, num_labels=n, dtype=torch.float32, ignore_mismatched_sizes=True, **from_pretrained)
            if model.config.pad_token_id is None:  # decoders find each row's last token through the pad id
                model.config.pad_token_id = self.tokenizer.pad_token_id
        names = {name.split(".")[0] for name, _ in model.named_children()}
        self.trained_modules = tuple(h for h in self.HEADS if h in names)
        if not self.trained_modules:
            raise models.ModelError(f"model {self.spec.model!r} has no classification head named one of "
                                    f"{list(self.HEADS)}; corolla cannot tell which module to train in full.")
        model.requires_grad_(False)
        return model.eval()

    def lora_config(self, rank: int, lora: LoraSpec) -> LoraConfig:
        """LoRA on the spec's targets (default: peft's for the architecture), the classification head trained in full."""
        return LoraConfig(
            r=rank, lora_alpha=lora.alpha, use_rslora=lora.rslora, lora_dropout=0.0,
            target_modules=models.lora_targets(lora.target_modules, self.model_type),
            modules_to_save=list(self.trained_modules), fan_in_fan_out=models.fan_in_fan_out(self.model_type),
        )

    def _tokenize(self, rows: dict[str, list]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [str(t) for t in rows["text"]], truncation=True, padding="max_length", max_length=self.spec.max_length,
            return_tensors="pt",
        )
        return {k: enc[k] for k in ("input_ids", "attention_mask")}

    def encode(self, ds: datasets.Dataset) -> Encoded | LazyEncoded:
        """Tokenize a small set once into fixed-length tensors; keep a large one on disk and tokenize per batch.

        In memory (`Encoded`) when it holds at most EAGER_MAX_TOKENS tokens and
        EAGER_MAX_TEXT_BYTES of text (the built-in corpora and their test splits, small
        silos), tokenized ENCODE_CHUNK rows at a time so the tokenizer's per-text state
        never holds the whole set. Otherwise `LazyEncoded`: the memory-mapped Dataset,
        rows tokenized when a batch draws them. Both give identical tensors. An empty
        set gives zero rows (refused later by the trainer).
        """
        if len(ds) == 0:
            empty = torch.zeros((0, self.spec.max_length), dtype=torch.long)
            return Encoded(inputs={"input_ids": empty, "attention_mask": empty}, labels=torch.zeros(0, dtype=torch.long))
        ds = ds.select_columns(["text", "label"])
        table = ds.data
        text_bytes = table.column("text").nbytes * len(ds) / max(table.num_rows, 1)
        if len(ds) * self.spec.max_length > EAGER_MAX_TOKENS or text_bytes > EAGER_MAX_TEXT_BYTES:
            return LazyEncoded(ds, self._tokenize)
        parts = [self._tokenize(ds[i:i + ENCODE_CHUNK]) for i in range(0, len(ds), ENCODE_CHUNK)]
        inputs = {k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "attention_mask")}
        return Encoded(inputs=inputs, labels=torch.tensor(list(ds["label"]), dtype=torch.long))

    def builtin_partition(self, partition_id: int, num_partitions: int, alpha: float) -> datasets.Dataset:
        """The corpus's training split, Dirichlet-partitioned by label."""
        self._no_builtin_for_custom_labels()
        return data.builtin_partition(partition_id, num_partitions, alpha, seed=self.spec.seed, name=self.spec.dataset)

    def builtin_test(self) -> datasets.Dataset:
        """The corpus's held-out test split (20 %, stratified)."""
        self._no_builtin_for_custom_labels()
        return data.builtin_split(self.spec.dataset, seed=self.spec.seed)[1]

    def _no_builtin_for_custom_labels(self) -> None:
        if self.spec.labels:
            raise data.SiloError(f"labels {list(self.spec.labels)} are your own classes, so there is no built-in data "
                                 "for them: give each client --data and the server `test-data`.")

    def load_silo(self, source: DataSource, text_column: str, label_column: str,
                  cache_dir: str | None = None) -> datasets.Dataset:
        """Text and labels (the configured class names, or their ids) from `source` (streamed when large)."""
        return load_labelled(source, self.label_names, text_column, label_column, cache_dir=cache_dir)
