"""Instruction tuning of a causal decoder: prompt → response pairs, loss on the response tokens only.

Each example is rendered with the tokenizer's chat template when it has one (user
turn = the prompt, assistant turn = the response), else as the prompt, a newline, the
response and end-of-sequence. The prompt's tokens are masked out of the loss (label -100), as
TRL's completion-only loss does for prompt/completion data, so the model learns to
answer, not to repeat questions. Rows longer than `max-length` are cut from the
right; the cut rows are counted and logged, and a row whose whole response was cut
scores nothing.

The built-in corpus turns WordNet 3.0 into instructions ("Define the noun 'X'." →
its gloss), labelled by lexicographer category so simulated silos are split
non-IID by topic. Evaluation reports response-token loss and accuracy (next-token
accuracy on the answer), perplexity, and ROUGE-L of greedy answers to a few
held-out prompts (Google's `rouge-score` package).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import datasets
import numpy as np
import torch
from peft import LoraConfig
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from corolla.data import silo as data
from corolla.data.instructions import load_instructions
from corolla.data.source import DataSource
from corolla.learning import models
from corolla.learning.tasks.base import Encoded, LazyEncoded, Task
from corolla.spec import LoraSpec, TaskSpec

log = logging.getLogger(__name__)

IGNORE = -100
#: the built-in test split is this many held-out definitions (evaluating a decoder on a CPU is not free)
BUILTIN_TEST_ROWS = 200
#: held-out prompts answered greedily at each evaluation for ROUGE-L, and the answer length
GENERATIONS = 16
GENERATION_TOKENS = 40
#: a silo larger than this is tokenized per batch instead of up front
EAGER_MAX_ROWS = 4096


def instruction(lemma: str) -> str:
    """The built-in corpus's prompt for one WordNet noun."""
    return f"Define the noun '{lemma}'."


class CausalLM(Task):
    """SmolLM2-135M-Instruct (embedded), a tiny seeded Llama (tests) or any local decoder folder, tuned with LoRA."""

    name = "causal-lm"

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.truncated = 0

    @property
    def label_names(self) -> tuple[str, ...]:
        """No classes: the categories of the built-in corpus only shape its partitions."""
        return ()

    @functools.cached_property
    def source(self) -> models.ModelSource | None:
        """The decoder's folder (None for `tiny-llama`, built from a config with SmolLM2's tokenizer)."""
        if self.spec.model == "tiny-llama":
            return None
        src = models.resolve(self.spec.model)
        if not src.is_decoder:
            raise models.ModelError(f"model {self.spec.model!r} is a {src.model_type} encoder, which cannot generate; "
                                    "task=causal-lm needs a decoder.")
        return src

    @property
    def model_type(self) -> str:
        """The architecture (config.json's `model_type`; "llama" for the built-in tiny model): picks LoRA's defaults."""
        return self.source.model_type if self.source else "llama"

    @functools.cached_property
    def tokenizer(self):  # noqa: ANN201 - transformers' tokenizer type
        """The decoder's tokenizer (a pad token added when it has none)."""
        return models.load_tokenizer(self.source.path if self.source else models.smollm2_path())

    def load_base_model(self, **from_pretrained: Any) -> nn.Module:
        """Load the decoder in float32, or build the seeded 2-layer, 64-wide tiny Llama."""
        if self.source is None:
            self._no_load_options(from_pretrained, "the tiny test Llama")
            cfg = LlamaConfig(vocab_size=len(self.tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512, tie_word_embeddings=True,
                              pad_token_id=self.tokenizer.pad_token_id)
            with torch.random.fork_rng():
                torch.manual_seed(1234)
                model = LlamaForCausalLM(cfg)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.source.path, dtype=torch.float32, **from_pretrained)
        model.requires_grad_(False)
        return model.eval()

    def lora_config(self, rank: int, lora: LoraSpec) -> LoraConfig:
        """LoRA on the spec's targets, default peft's for the architecture (q_proj/v_proj for Llama)."""
        return LoraConfig(r=rank, lora_alpha=lora.alpha, use_rslora=lora.rslora, lora_dropout=0.0,
                          target_modules=models.lora_targets(lora.target_modules, self.model_type), task_type="CAUSAL_LM",
                          fan_in_fan_out=models.fan_in_fan_out(self.model_type))

    # ---- encoding ---------------------------------------------------------------------------
    def _render(self, prompt: str | list[dict], response: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt (ending where the answer starts) and of prompt + answer."""
        tok = self.tokenizer
        head = self.prompt_text(prompt)
        full = head + response + (tok.eos_token or "")
        if tok.chat_template:
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            templated = tok.apply_chat_template([*turns, {"role": "assistant", "content": response}], tokenize=False)
            if templated.startswith(head):  # else the template rewrites earlier turns: keep the concatenation
                full = templated
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        return head_ids, tok(full, add_special_tokens=False)["input_ids"]

    def prompt_text(self, prompt: str | list[dict]) -> str:
        """The text a generation starts from (the chat template's assistant prefix)."""
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return "\n".join(t["content"] for t in turns) + "\n"

    def _encode_rows(self, rows: dict[str, list]) -> dict[str, torch.Tensor]:
        length, pad = self.spec.max_length, self.tokenizer.pad_token_id
        n = len(rows["response"])
        ids = torch.full((n, length), pad, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), IGNORE, dtype=torch.long)
        for i, (prompt, response) in enumerate(zip(rows["prompt"], rows["response"])):
            head, full = self._render(prompt, response)
            if len(full) > length:
                self.truncated += 1
                full = full[:length]
            k = len(full)
            ids[i, :k] = torch.tensor(full)
            mask[i, :k] = 1
            if len(head) < k:
                labels[i, len(head):k] = ids[i, len(head):k]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def encode(self, ds: datasets.Dataset) -> Encoded | LazyEncoded:
        """Tokenize a small set up front; a large one stays memory-mapped and is tokenized per batch."""
        self.truncated = 0
        if len(ds) > EAGER_MAX_ROWS:
            return LazyEncoded(ds, self._encode_rows)
        enc = self._encode_rows(ds[:] if len(ds) else {"prompt": [], "response": []})
        if self.truncated:
            log.warning("%d of %d examples are longer than max-length=%d tokens and were cut (their answers "
                        "partly or wholly unscored); raise max-length to keep them whole",
                        self.truncated, len(ds), self.spec.max_length)
        labels = enc.pop("labels")
        return Encoded(inputs=enc, labels=labels, source=ds)  # the prompts, for ROUGE-L of a site's evaluation

    # ---- loss and metrics -------------------------------------------------------------------
    @staticmethod
    def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token NLL of each next token and the mask of scored (response) tokens."""
        logits, targets = logits[:, :-1], labels[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          ignore_index=IGNORE, reduction="none").view(targets.shape)
        return nll, targets != IGNORE

    def per_example_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean NLL over each example's response tokens (0 for an example whose answer was cut away)."""
        nll, scored = self._token_nll(logits, labels)
        return (nll * scored).sum(1) / scored.sum(1).clamp(min=1)

    def eval_sums(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        """Summed response-token NLL, correctly predicted response tokens, response tokens."""
        nll, scored = self._token_nll(logits, labels)
        right = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & scored
        return float((nll * scored).sum()), int(right.sum()), int(scored.sum())

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[str | list[dict]], device: torch.device,
                 max_new_tokens: int = GENERATION_TOKENS) -> list[str]:
        """Greedy answers to `prompts` (left-padded batch)."""
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok([self.prompt_text(p) for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device)
        finally:
            tok.padding_side = side
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def extra_metrics(self, loss: float, model: nn.Module, ds: datasets.Dataset, device: torch.device) -> dict[str, float]:
        """Perplexity = exp(response-token loss), and ROUGE-L (F) of greedy answers to the first held-out prompts."""
        from rouge_score import rouge_scorer

        rows = ds[:GENERATIONS]
        answers = self.generate(model, list(rows["prompt"]), device)
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [scorer.score(ref, ans)["rougeL"].fmeasure for ref, ans in zip(rows["response"], answers)]
        return {"perplexity": float(np.exp(min(loss, 50.0))), "rouge_l": float(np.mean(scores)) if scores else 0.0}

    # ---- data -------------------------------------------------------------------------------
    @functools.cached_property
    def _builtin(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        if self.spec.dataset != "wordnet":
            raise data.SiloError(f"dataset {self.spec.dataset!r} is not an instruction corpus; use dataset=wordnet "
                                 "or give silos with prompt/response columns.")
        rows = data.read_wordnet_definitions()
        features = datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=list(data.WORDNET_LABELS))})
        ds = datasets.Dataset.from_dict({"prompt": [instruction(lemma) for lemma, _, _ in rows],
                                         "response": [d for _, d, _ in rows], "label": [c for _, _, c in rows]},
                                        features=features)
        split = ds.train_test_split(test_size=BUILTIN_TEST_ROWS, seed=self.spec.seed, stratify_by_column="label")
        return split["train"], split["test"]

    def builtin_partition(self, partition_id: int, num_partitions: int, alpha: float) -> datasets.Dataset:
        """A simulated silo: the instruction corpus split by category with Dirichlet(alpha) skew."""
        return data.partition_dataset(self._builtin[0], partition_id, num_partitions, alpha, self.spec.seed)

    def builtin_test(self) -> datasets.Dataset:
        """BUILTIN_TEST_ROWS held-out definitions, stratified by category."""
        return self._builtin[1]

    def load_silo(self, source: DataSource, text_column: str, label_column: str,
                  cache_dir: str | None = None) -> datasets.Dataset:
        """`prompt`/`response` columns or chat `messages` from `source` (see `corolla.data.instructions`)."""
        return load_instructions(source, cache_dir=cache_dir)
