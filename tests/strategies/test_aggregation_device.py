"""`aggregation-device`: where FedHL keeps its dense W. The name is checked at configuration time, the device
where W is built (the server), and a checkpoint always holds CPU tensors.

No test needs a GPU: CUDA's presence is patched, so the refusals are the same on every machine. The CUDA
path itself was not run in this repository's CI (no GPU there); docs/design.md (Known limitations) says so.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from corolla.config import ConfigError, RunConfig
from corolla.strategies import ClientUpdate, FedHL, lora_ops
from tests.strategies.test_fedhl_fold import LORA, MAX_RANK, start, trained


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_device_name_that_is_no_device_is_refused_at_configuration_time():
    with pytest.raises(ConfigError, match=r"`aggregation-device` = 'gpu0' is not a device; use cpu, auto .*cuda:N"):
        RunConfig.from_mapping({"aggregation-device": "gpu0"})
    for ok in ("cpu", "auto", "cuda", "cuda:1"):
        assert RunConfig.from_mapping({"aggregation-device": ok}).aggregation_device == ok


def test_cuda_on_a_server_without_a_gpu_stops_with_the_fix(no_gpu):
    with pytest.raises(ValueError, match=r"no CUDA GPU .* use aggregation-device=cpu, or auto"):
        FedHL(start(), LORA, max_rank=MAX_RANK, device="cuda")


def test_a_gpu_index_the_server_does_not_have_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"has 2 CUDA GPU\(s\) \(cuda:0..cuda:1\); pick one of those"):
        lora_ops.resolve_device("cuda:2")
    assert lora_ops.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_auto_takes_the_cpu_when_there_is_no_gpu(no_gpu):
    agg = FedHL(start(), LORA, max_rank=MAX_RANK, device="auto")
    assert agg.device == torch.device("cpu") and agg.summary()["device"] == "cpu"
    assert all(w.device.type == "cpu" for w in agg.w.values())


def test_explicit_cpu_is_the_default_route_and_pickles_to_the_same_model():
    runs = []
    for kw in ({}, {"device": "cpu"}):
        agg = FedHL(start(), LORA, max_rank=MAX_RANK, **kw)
        for v in range(2):
            sent = [agg.dispatch(r) for r in (2, 8)]
            agg.aggregate([ClientUpdate(node_id=i, arrays=trained(d, 10 * v + i), sent=d, num_examples=5)
                           for i, d in enumerate(sent)])
        runs.append(agg)
    restored = pickle.loads(pickle.dumps(runs[1]))
    assert restored.device == torch.device("cpu") and restored.device_name == "cpu"
    for layer, w in runs[0].w.items():
        np.testing.assert_array_equal(runs[1].w[layer].numpy(), w.numpy())
        np.testing.assert_array_equal(restored.w[layer].numpy(), w.numpy())


def test_a_checkpoint_from_before_aggregation_device_resumes_on_the_cpu():
    agg = FedHL(start(), LORA, max_rank=MAX_RANK)
    state = agg.__getstate__()
    state.pop("device_name")
    old = FedHL.__new__(FedHL)
    old.__setstate__(state)
    assert old.device == torch.device("cpu") and old.dispatch(4).rank == 4
