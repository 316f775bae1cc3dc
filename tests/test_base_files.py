"""A coordinator without the base model: the fingerprint and the initial adapter read from the model folder's files.

`BaseFiles` must agree with a trainer that loaded the model (same fingerprint, the same
initial adapter bit for bit), see every frozen weight and the label set but not the
head, refuse what it cannot describe from files, and never read the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, LlamaForCausalLM

from corolla.learning import models, weight_files
from corolla.learning.base_files import BaseFiles, NeedsModel, shape_initial_adapter, weight_fingerprint
from corolla.learning.tasks import build_task
from corolla.learning.train_loop import AdapterModel, initial_adapter
from corolla.modelinfo import ModelError
from corolla.spec import LoraSpec, TaskSpec

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _bert(num_labels: int | None) -> torch.nn.Module:
    """A tiny BERT with MiniLM's vocabulary: a bare encoder (`None`) or one with a classification head."""
    tok = models.load_tokenizer(models.minilm_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    if num_labels is None:
        return BertModel(cfg)
    cfg.num_labels = num_labels
    return BertForSequenceClassification(cfg)


def save_folder(d: Path, model: torch.nn.Module, tokenizer_from: str, **save: object) -> Path:
    """Save `model` with a tokenizer, as a user's folder would be."""
    model.save_pretrained(d, **save)
    models.load_tokenizer(tokenizer_from).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bert_bare(tmp_path_factory) -> Path:
    """A tiny BERT encoder without a head (like MiniLM's folder, but with the `bert.`-less names of a BertModel)."""
    return save_folder(tmp_path_factory.mktemp("bert-bare"), _bert(None), models.minilm_path())


@pytest.fixture(scope="module")
def bert_head(tmp_path_factory) -> Path:
    """A tiny BERT fine-tuned for 5 classes: its folder holds a head of BBC's size, which the trainer loads."""
    return save_folder(tmp_path_factory.mktemp("bert-head"), _bert(5), models.minilm_path())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama decoder saved with save_pretrained, sharded into several files with an index."""
    tok = models.load_tokenizer(models.smollm2_path())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id))
    d = save_folder(tmp_path_factory.mktemp("llama"), model, models.smollm2_path(), max_shard_size="2MB")
    assert (d / weight_files.SAFE_WEIGHTS_INDEX).is_file() and len(list(d.glob("*.safetensors"))) > 1
    return d


def _spec(folder: str | Path, task: str = "text-classification", **kw: object) -> TaskSpec:
    return TaskSpec(task=task, model=str(folder), dataset="bbc" if task == "text-classification" else "wordnet", **kw)


CASES = {
    "minilm": lambda dirs: TaskSpec(model="minilm", dataset="bbc"),
    "smollm2-causal": lambda dirs: TaskSpec(task="causal-lm", model="smollm2"),
    "smollm2-classify": lambda dirs: TaskSpec(model="smollm2", dataset="wordnet"),
    "bert-bare": lambda dirs: _spec(dirs["bert_bare"]),
    "bert-head": lambda dirs: _spec(dirs["bert_head"]),
    "llama-sharded": lambda dirs: _spec(dirs["llama_dir"], "causal-lm"),
}


@pytest.fixture(scope="module")
def dirs(bert_bare, bert_head, llama_dir) -> dict[str, Path]:
    return {"bert_bare": bert_bare, "bert_head": bert_head, "llama_dir": llama_dir}


@pytest.mark.parametrize("case", list(CASES))
def test_agrees_with_a_trainer_that_loaded_the_model(case, dirs):
    """Same fingerprint as the trainer's, and the initial adapter of `initial_adapter` bit for bit (keys, shapes, values)."""
    spec = CASES[case](dirs)
    coordinator = BaseFiles(spec)
    trainer = AdapterModel(build_task(spec), CPU)
    assert coordinator.fingerprint == trainer.fingerprint == weight_fingerprint(build_task(spec))
    lora = LoraSpec(alpha=8.0)
    mine = coordinator.initial_adapter(4, lora, seed=11)
    ref = initial_adapter(build_task(spec), 4, lora, 11)
    assert sorted(mine) == sorted(ref)
    for k, v in ref.items():
        assert mine[k].dtype == np.float32 and mine[k].shape == v.shape, k
        np.testing.assert_array_equal(mine[k], v, err_msg=k)
    assert any("lora_A" in k for k in mine) and all(not v.any() for k, v in mine.items() if "lora_B" in k)


@pytest.mark.parametrize("lora", [LoraSpec(rslora=True, alpha=5.0), LoraSpec(target_modules=("all-linear",))],
                         ids=["rslora", "all-linear"])
def test_lora_options_and_seeds(lora, llama_dir):
    """Other LoRA specifications stay bit-identical; the seed changes A and nothing else; repeated calls agree."""
    task = build_task(_spec(llama_dir, "causal-lm"))
    a = shape_initial_adapter(task, 8, lora, seed=1)
    ref = initial_adapter(task, 8, lora, 1)
    assert sorted(a) == sorted(ref) and all(np.array_equal(a[k], ref[k]) for k in ref)
    again = shape_initial_adapter(task, 8, lora, seed=1)
    other = shape_initial_adapter(task, 8, lora, seed=2)
    assert all(np.array_equal(a[k], again[k]) for k in a)
    for k in a:
        if "lora_A" in k:
            bound = 1 / np.sqrt(a[k].shape[1])  # kaiming-uniform with a = √5 on an (r, in) weight: U(±1/√in)
            assert np.abs(a[k]).max() <= bound and not np.array_equal(a[k], other[k])
        else:
            assert not a[k].any()  # B = 0: the first ΔW is zero


def _copy_with(src: Path, dst: Path, change) -> Path:  # noqa: ANN001 - a function of the state dict
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    change(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_fingerprint_sees_frozen_weights_and_labels_not_the_head(bert_head, tmp_path):
    base = weight_fingerprint(build_task(_spec(bert_head)))

    def frozen(sd):
        sd["bert.encoder.layer.1.attention.self.query.weight"][0, 0] += 1e-3

    def head(sd):
        sd["classifier.weight"].mul_(-2.0)
        sd["classifier.bias"].add_(1.0)

    assert weight_fingerprint(build_task(_spec(_copy_with(bert_head, tmp_path / "frozen", frozen)))) != base
    assert weight_fingerprint(build_task(_spec(_copy_with(bert_head, tmp_path / "head", head)))) == base
    labels = _spec(bert_head, labels=("a", "b", "c", "d", "e"))
    assert weight_fingerprint(build_task(labels)) != base
    # the trainer agrees on each: its fingerprint is the files'
    assert AdapterModel(build_task(_spec(tmp_path / "head")), CPU).fingerprint == base


def test_sharding_does_not_change_the_fingerprint(bert_bare, tmp_path):
    sharded = save_folder(tmp_path / "sharded", BertModel.from_pretrained(bert_bare), models.minilm_path(),
                          max_shard_size="1MB")
    assert (sharded / weight_files.SAFE_WEIGHTS_INDEX).is_file()
    assert weight_fingerprint(build_task(_spec(sharded))) == weight_fingerprint(build_task(_spec(bert_bare)))


def test_a_folder_missing_a_frozen_weight_is_refused(bert_bare, tmp_path):
    """transformers would draw the missing weight at random on every host: both sides refuse rather than agree."""
    spec = _spec(_copy_with(bert_bare, tmp_path / "holey", lambda sd: sd.pop("encoder.layer.0.output.dense.weight")))
    with pytest.raises(ModelError, match="lacks weights"):
        BaseFiles(spec).initial_adapter(4, LoraSpec(), seed=0)
    with pytest.raises(ModelError, match="lacks weights"):
        AdapterModel(build_task(spec), CPU)


def test_what_needs_the_model_says_so(bert_bare, tmp_path):
    bin_only = tmp_path / "bin"
    shutil.copytree(bert_bare, bin_only)
    sd = load_file(str(bin_only / "model.safetensors"))
    (bin_only / "model.safetensors").unlink()
    torch.save(sd, bin_only / "pytorch_model.bin")
    for spec in (TaskSpec(model="tiny-bert"), TaskSpec(task="causal-lm", model="tiny-llama"), _spec(bin_only),
                 TaskSpec(task="image-classification")):
        with pytest.raises(NeedsModel, match="needs the model"):
            BaseFiles(spec)
    # without files, the fingerprint stays the loaded model's (and needs it)
    task = build_task(TaskSpec(model="tiny-bert"))
    with pytest.raises(ValueError, match="needs the loaded model"):
        task.fingerprint()
    assert AdapterModel(task, CPU).fingerprint == task.fingerprint(task.load_base_model())


def test_a_trainer_loads_the_coordinators_adapter_and_trains(bert_bare):
    spec = _spec(bert_bare)
    lora = LoraSpec()
    arrays = BaseFiles(spec).initial_adapter(4, lora, seed=3)
    task = build_task(spec)
    trainer = AdapterModel(task, CPU)
    trainer.load(arrays, 4, lora)
    data = task.encode(datasets.Dataset.from_dict({"text": ["a cat", "the markets fell", "a goal", "new phone"],
                                                   "label": [0, 1, 2, 3]}))
    out, stats = trainer.train(arrays, 4, data, lora=lora, steps=1, batch_size=4, lr=1e-2, seed=0)
    assert sorted(out) == sorted(arrays) and stats.steps == 1 and np.isfinite(stats.loss_mean)
    assert any(not np.array_equal(out[k], arrays[k]) for k in out if "lora_B" in k)


PROBE = """
import json, sys
sys.path.insert(0, sys.argv[3])
from bench.coordinator_memory import peak_rss_bytes as peak
from corolla.learning.base_files import BaseFiles
from corolla.spec import LoraSpec, TaskSpec
warm = BaseFiles(TaskSpec(task="causal-lm", model=sys.argv[1]))  # imports and the architecture's code, once
warm.initial_adapter(4, LoraSpec(), seed=0)
before = peak()
big = BaseFiles(TaskSpec(task="causal-lm", model=sys.argv[2]))
adapter = big.initial_adapter(8, LoraSpec(), seed=0)
print(json.dumps({"growth": peak() - before, "tensors": len(adapter)}))
"""


def test_no_weight_is_read(llama_dir, tmp_path):
    """Peak RSS grows by far less than the weights while a coordinator describes a ~300 MB random Llama folder.

    Peak RSS is the fresh process's VmHWM (its `ru_maxrss` would carry this test process's peak over).
    """
    sys.path.insert(0, str(ROOT))
    from bench.coordinator_memory import write_random_llama

    big = tmp_path / "llama-big"
    write_random_llama(big, hidden=1024, layers=8, intermediate=2816, vocab=32000, heads=16, kv_heads=4, shard_gb=0.125)
    size = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    assert size > 250 * 2**20
    out = subprocess.run([sys.executable, "-c", PROBE, str(llama_dir), str(big), str(ROOT)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tensors"] == 2 * 2 * 8  # q_proj and v_proj of 8 layers, A and B
    assert result["growth"] < 0.1 * size, (result, size)
