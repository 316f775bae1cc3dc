"""A trainer's own compute choices (gradient checkpointing, a 4-bit base): same adapter out, clear refusals.

The CUDA side (bf16, QLoRA) is measured by bench/gpu_clients.py on a GPU machine; these
tests run anywhere and check what must hold on every machine.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import BitsAndBytesConfig

from corolla.learning.tasks import build_task
from corolla.learning.tasks.causal_lm import instruction
from corolla.learning.train_loop import AdapterModel, ComputeOptions, initial_adapter
from corolla.spec import LoraSpec, TaskSpec

LORA = LoraSpec()


def checkpointing(model) -> bool:
    """transformers 5.2x renamed the flag; read whichever this version has."""
    return bool(getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing)


@pytest.fixture(scope="module")
def task_and_data():
    task = build_task(TaskSpec(task="causal-lm", model="tiny-llama", max_length=48))
    ds = datasets.Dataset.from_dict({"prompt": [instruction(w) for w in ("dog", "cat", "oak", "river")],
                                     "response": ["a canine", "a feline", "a tree", "a stream of water"]})
    return task, task.encode(ds)


def _train(task, data, compute: ComputeOptions):
    """Train 3 steps from the seeded initial adapter; count the forward runs of layer 0's attention.

    The attention runs inside the checkpointed region (a layer's own hooks stay outside it)
    and holds LoRA, so its inputs must be recomputed in the backward pass.
    """
    model = AdapterModel(task, torch.device("cpu"), compute)
    calls = []
    model.base.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    start = initial_adapter(task, 4, LORA, seed=0)
    arrays, stats = model.train(start, 4, data, lora=LORA, steps=3, batch_size=4, lr=1e-2, seed=7)
    return model, arrays, stats, len(calls)


def test_gradient_checkpointing_recomputes_and_returns_the_same_adapter(task_and_data):
    task, data = task_and_data
    _, plain, plain_stats, plain_calls = _train(task, data, ComputeOptions())
    model, ckpt, ckpt_stats, ckpt_calls = _train(task, data, ComputeOptions(gradient_checkpointing=True))
    assert checkpointing(model.base)
    assert plain_calls == 3 and ckpt_calls == 6  # each step's layer runs again in the backward pass
    assert plain.keys() == ckpt.keys()
    for k in plain:
        np.testing.assert_allclose(ckpt[k], plain[k], rtol=0, atol=1e-6, err_msg=k)
    assert ckpt_stats.loss_mean == pytest.approx(plain_stats.loss_mean, abs=1e-6)
    assert np.abs(ckpt[next(iter(ckpt))] - initial_adapter(task, 4, LORA, seed=0)[next(iter(ckpt))]).max() > 0


def test_a_model_without_checkpointing_support_is_refused():
    task = build_task(TaskSpec(task="image-classification", model="cnn", dataset="fashion-mnist"))
    with pytest.raises(ValueError, match="does not support gradient checkpointing; drop the flag"):
        AdapterModel(task, torch.device("cpu"), ComputeOptions(gradient_checkpointing=True))


def test_4bit_needs_cuda_and_a_model_folder(task_and_data):
    task, _ = task_and_data
    with pytest.raises(ValueError, match=r"--quantize 4bit needs a CUDA device .* Drop --quantize or start the trainer"):
        AdapterModel(task, torch.device("cpu"), ComputeOptions(quantize="4bit"))
    with pytest.raises(ValueError, match=r"tiny test Llama is built in code, .* needs a model folder"):
        task.load_base_model(quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(ValueError, match=r"--quantize '8bit' is not one of \['none', '4bit'\]"):
        ComputeOptions(quantize="8bit")


def test_trainer_flags_reach_the_model(tmp_path, monkeypatch):
    """`corolla trainer --gradient-checkpointing` builds a trainer whose base recomputes activations."""
    import argparse

    from corolla.client.args import add_trainer_args
    from corolla.client.trainer_process import build_trainer

    p = argparse.ArgumentParser()
    add_trainer_args(p)
    silo = tmp_path / "silo.jsonl"
    silo.write_text('{"prompt": "Define the noun \'dog\'.", "response": "a canine"}\n' * 3)
    args = p.parse_args(["--task", "causal-lm", "--model", "tiny-llama", "--data", str(silo), "--rank", "4",
                         "--device", "cpu", "--gradient-checkpointing"])
    trainer = build_trainer(args)
    assert trainer.model.compute == ComputeOptions(gradient_checkpointing=True)
    assert checkpointing(trainer.model.base)
    with pytest.raises(SystemExit):
        p.parse_args(["--quantize", "8bit"])


def test_trailing_padding_is_trimmed_per_batch():
    from corolla.learning.tasks.base import trim_padding

    ids = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, 6, -100, -100, -100], [-100, -100, -100, -100, -100]])
    inputs, out = trim_padding({"input_ids": ids, "attention_mask": mask}, labels)
    assert inputs["input_ids"].tolist() == [[5, 6], [7, 0]] and out.tolist() == [[-100, 6], [-100, -100]]
    left = {"input_ids": ids.flip(1), "attention_mask": mask.flip(1)}
    assert trim_padding(left, torch.tensor([1, 0]))[0]["input_ids"].shape == (2, 5)  # left padding: untouched
    cls = trim_padding({"input_ids": ids, "attention_mask": mask}, torch.tensor([1, 0]))[1]
    assert cls.tolist() == [1, 0]  # class labels are not columns


def test_trimmed_batches_score_like_full_width_ones(task_and_data):
    """The batch the training loop sees is narrower than max-length, and its loss is the full-width loss."""
    task, data = task_and_data
    idx = torch.arange(len(data))
    inputs, labels = data.batch(idx, torch.device("cpu"))
    assert inputs["input_ids"].shape[1] < task.spec.max_length
    assert inputs["attention_mask"][:, -1].any()  # the longest row ends in the last kept column
    model = task.load_base_model()
    trimmed = task.per_example_loss(task.logits(model, inputs).float(), labels)
    full = task.per_example_loss(task.logits(model, data.inputs).float(), data.labels)
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-5)
