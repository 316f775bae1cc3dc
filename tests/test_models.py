"""Bring your own model: model folders, family detection, LoRA defaults, and the causal-LM task's loss and data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from corolla.config import ConfigError, RunConfig
from corolla.data.silo import SiloError
from corolla.learning import models
from corolla.learning.tasks import build_task
from corolla.learning.tasks.causal_lm import IGNORE, CausalLM, instruction
from corolla.learning.train_loop import AdapterModel, initial_adapter
from corolla.modelinfo import ModelError, read_model_type
from corolla.spec import LoraSpec, TaskSpec


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder, with SmolLM2's tokenizer minus its pad token (like many LLMs)."""
    tok = models.load_tokenizer(models.smollm2_path())
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d)
    tok.pad_token = None
    tok.save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def save_tiny(d, family: str):
    """A tiny model of `family` built from a config and saved with a tokenizer, as a user's folder would be."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    tok = models.load_tokenizer(models.minilm_path() if family in ("bert", "roberta") else models.smollm2_path())
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, **small))
    elif family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(vocab_size=tok.vocab_size, pad_token_id=0,
                                                               max_position_embeddings=80, **small))
    elif family == "gpt2":  # Conv1D projections, weights stored (in, out)
        from transformers import GPT2Config, GPT2ForSequenceClassification

        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                                         n_positions=128))
    else:
        model = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=len(tok), num_key_value_heads=1, **small))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT folder with MiniLM's tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("bert"), "bert")


# ---- configuration -------------------------------------------------------------------------------
def test_model_folder_errors_name_the_problem(tmp_path, bert_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig(model=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no config.json"):
        RunConfig(model=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(ConfigError, match="architecture 'whisper'.*not support"):
        RunConfig(model=str(tmp_path))
    with pytest.raises(ConfigError, match="encoder, which cannot generate"):
        RunConfig(task="causal-lm", model=str(bert_dir))
    with pytest.raises(ConfigError, match="not a model of task causal-lm"):
        RunConfig(task="causal-lm", model="minilm")
    assert read_model_type(bert_dir) == "bert"


def test_auto_model_and_dataset_follow_the_task():
    assert (RunConfig().task_spec().model, RunConfig().task_spec().dataset) == ("minilm", "bbc")
    spec = RunConfig(task="causal-lm").task_spec()
    assert (spec.model, spec.dataset) == ("smollm2", "wordnet")


# ---- your own model for classification ------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "qwen2", "gpt2"])
def test_own_model_folder_classifies_and_learns(family, tmp_path, bert_dir, llama_dir):
    path = {"bert": bert_dir, "llama": llama_dir}.get(family) or save_tiny(tmp_path, family)
    encoder = family in ("bert", "roberta")
    task = build_task(TaskSpec(task="text-classification", model=str(path), dataset="bbc", max_length=24))
    model = AdapterModel(task, torch.device("cpu"))
    assert task.trained_modules == (("classifier",) if encoder else ("score",))
    assert task.tokenizer.pad_token is not None  # the Llama folder has none: its end-of-sequence token pads
    lora = LoraSpec()
    start = initial_adapter(task, 4, lora, seed=0)
    wrapped = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in start if ".lora_" in k}
    assert wrapped == ({"query", "value"} if encoder else {"c_attn"} if family == "gpt2" else {"q_proj", "v_proj"})
    assert any(k.startswith(f"base_model.model.{task.trained_modules[0]}") for k in start)  # the head travels
    texts = ["stocks fell and markets slid", "the team won the cup final"] * 8
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts, "label": [0, 3] * 8})
    enc = task.encode(ds)
    before = model.evaluate(start, 4, enc, lora)
    arrays, _ = model.train(start, 4, enc, lora=lora, steps=40, batch_size=8, lr=3e-2, seed=0)
    after = model.evaluate(arrays, 4, enc, lora)
    assert after.accuracy == 1.0 and after.loss < 0.5 * before.loss, (before, after)
    # the fingerprint covers the frozen base only (the fresh head is left out), so a second load agrees
    again = build_task(task.spec)
    assert again.fingerprint(again.load_base_model()) == model.fingerprint


def test_target_modules_override_and_unknown_targets(llama_dir):
    task = build_task(TaskSpec(task="causal-lm", model=str(llama_dir)))
    start = initial_adapter(task, 2, LoraSpec(target_modules=("o_proj", "down_proj")), seed=0)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in start} == {"o_proj", "down_proj"}
    with pytest.raises(ValueError, match="lora-target-modules \\['query'\\] cannot be applied"):
        initial_adapter(task, 2, LoraSpec(target_modules=("query",)), seed=0)


# ---- the causal-LM task ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_task(llama_dir):
    return build_task(TaskSpec(task="causal-lm", model=str(llama_dir), max_length=64))


def test_only_response_tokens_are_scored(lm_task):
    rows = {"prompt": [instruction("dog")], "response": ["a member of the genus Canis"]}
    head, full = lm_task._render(rows["prompt"][0], rows["response"][0])
    enc = lm_task._encode_rows(rows)
    labels, ids = enc["labels"][0], enc["input_ids"][0]
    scored = labels != IGNORE
    assert int(scored.sum()) == len(full) - len(head)
    assert not scored[: len(head)].any()  # the prompt (and the chat template's system turn) is never scored
    answer = lm_task.tokenizer.decode(ids[scored])
    assert answer.startswith("a member of the genus Canis") and "<|im_end|>" in answer  # the model learns to stop
    assert int(enc["attention_mask"][0].sum()) == len(full)


def test_loss_and_eval_sums_match_hand_computation(lm_task):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, 5, 6]])
    logp = torch.log_softmax(logits, -1)
    # position t predicts labels[t + 1]
    ex0 = -(logp[0, 1, 3] + logp[0, 2, 4]) / 2
    ex1 = -(logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 5] + logp[1, 3, 6]) / 4
    torch.testing.assert_close(lm_task.per_example_loss(logits, labels), torch.stack([ex0, ex1]))
    loss, right, units = lm_task.eval_sums(logits, labels)
    assert units == 6
    assert loss == pytest.approx(float(2 * ex0 + 4 * ex1), rel=1e-5)
    pred = logits[:, :-1].argmax(-1)
    expected = sum(int(pred[i, t] == labels[i, t + 1]) for i in range(2) for t in range(4) if labels[i, t + 1] != IGNORE)
    assert right == expected


def test_cut_answers_are_counted_and_score_nothing(llama_dir):
    task = build_task(TaskSpec(task="causal-lm", model=str(llama_dir), max_length=16))
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": [instruction("dog")] * 3, "response": ["a domestic canine"] * 3})
    enc = task.encode(ds)
    assert task.truncated == 3  # the chat template's system turn alone is longer than 16 tokens
    assert (enc.labels == IGNORE).all()
    assert torch.equal(task.per_example_loss(torch.randn(3, 16, len(task.tokenizer)), enc.labels), torch.zeros(3))


def test_smollm2_learns_definitions_and_reports_perplexity_and_rouge():
    """The embedded SmolLM2 (a real pretrained decoder): a few LoRA steps lower the loss on the answers."""
    task = build_task(TaskSpec(task="causal-lm", model="smollm2", max_length=64))
    rows = task.builtin_test().select(range(8))
    enc = task.encode(rows)
    model = AdapterModel(task, torch.device("cpu"))
    lora = LoraSpec()
    start = initial_adapter(task, 8, lora, seed=0)
    before = model.evaluate(start, 8, enc, lora)
    arrays, stats = model.train(start, 8, enc, lora=lora, steps=6, batch_size=4, lr=3e-3, seed=0)
    after = model.evaluate(arrays, 8, enc, lora)
    assert after.loss < before.loss - 0.3 and after.accuracy > before.accuracy, (before, after)
    assert np.isfinite(stats.loss_mean) and stats.samples == 24
    extra = task.extra_metrics(after.loss, model.load(arrays, 8, lora), rows.select(range(2)), torch.device("cpu"))
    assert extra["perplexity"] == pytest.approx(np.exp(after.loss))
    assert 0.0 < extra["rouge_l"] <= 1.0  # greedy definitions share words with WordNet's glosses


def test_builtin_instruction_corpus_is_split_by_topic():
    task = CausalLM(TaskSpec(task="causal-lm", model="tiny-llama"))
    test = task.builtin_test()
    assert len(test) == 200 and test[0]["prompt"].startswith("Define the noun '")
    a, b = (task.builtin_partition(i, 8, 0.1) for i in (0, 1))
    top = [np.bincount(p["label"], minlength=26).argmax() for p in (a, b)]
    share = [np.bincount(p["label"], minlength=26).max() / len(p) for p in (a, b)]
    assert min(share) > 0.2 and top[0] != top[1]  # skewed silos with different dominant categories


# ---- instruction silos ----------------------------------------------------------------------------
def test_instruction_silos_prompt_response_and_messages(tmp_path):
    from corolla.data.files import FileSource
    from corolla.data.instructions import load_instructions

    def load_instruction_silo(path, cache_dir):
        return load_instructions(FileSource(path), cache_dir=cache_dir)

    pd.DataFrame({"prompt": ["What is 2+2?", "Capital of France?"], "response": ["4", "Paris"]}).to_csv(
        tmp_path / "qa.csv", index=False)
    ds = load_instruction_silo(str(tmp_path / "qa.csv"), cache_dir=str(tmp_path / "c"))
    assert ds["response"] == ["4", "Paris"]
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    ds = load_instruction_silo(str(tmp_path / "chat.jsonl"), cache_dir=str(tmp_path / "c"))
    assert ds[0]["response"] == "hello" and ds[0]["prompt"] == [{"role": "user", "content": "hi"}]
    pd.DataFrame({"question": ["a"], "answer": ["b"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SiloError, match="needs `prompt` and `response` columns, or a `messages` column"):
        load_instruction_silo(str(tmp_path / "bad.csv"), cache_dir=str(tmp_path / "c"))
    pd.DataFrame({"prompt": ["a", "b"], "response": ["x", " "]}).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(SiloError, match="1 rows have an empty response \\(first: row 1\\)"):
        load_instruction_silo(str(tmp_path / "empty.csv"), cache_dir=str(tmp_path / "c"))


def test_builtin_model_names_resolve_without_download():
    src = models.resolve("smollm2")
    assert src.model_type == "llama" and src.is_decoder
    assert (models.model_cache_dir() in __import__("pathlib").Path(src.path).parents)
    with pytest.raises(ModelError, match="unknown built-in model"):
        models.resolve("gpt-5")
