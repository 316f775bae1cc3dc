"""The ClientApp shim: forwards to a trainer and turns every failure into a clear error reply."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from corolla.client import app as shim
from corolla.launch import processes as launch
from corolla.proto import wire
from corolla.spec import LoraSpec


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # Messages built outside a running app need a task identity (platform.md).
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 2, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 3, raising=False)


def context(node_config):
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})


def train_message():
    cfg = ConfigRecord({wire.MODEL_VERSION: 0, wire.LORA_RANK: 4, wire.LOCAL_STEPS: 1, wire.BATCH_SIZE: 2,
                        wire.LR: 0.01, wire.PROX_MU: 0.0, wire.SEED: 0, wire.PUSHED_AT: 0.0,
                        wire.SOFTWARE: wire.SOFTWARE_VERSION, **LoraSpec().to_record()})
    arrays = ArrayRecord(array_dict={"x": Array.from_numpy_ndarray(np.zeros(2, np.float32))})
    return Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: cfg}), dst_node_id=2, message_type=MessageType.TRAIN)


def test_unreachable_trainer_gives_an_error_reply_naming_the_fix():
    port = launch.free_port()
    reply = shim.train(train_message(), context({wire.NODE_TRAINER: f"127.0.0.1:{port}"}))
    assert reply.has_error()
    assert f"trainer at 127.0.0.1:{port} is unreachable" in reply.error.reason
    assert "corolla client" in reply.error.reason


def test_missing_config_key_gives_an_error_reply():
    msg = train_message()
    del msg.content[wire.CONFIG][wire.LR]
    reply = shim.train(msg, context({wire.NODE_TRAINER: "127.0.0.1:1"}))
    assert reply.has_error() and "lr" in reply.error.reason


def test_shim_imports_no_torch():
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    code = "import sys, corolla.client.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=launch.flower_env(Path(tempfile.gettempdir()) / "corolla-flwr-test"))
    assert out.stdout.strip() == "False", out.stderr


def test_supernode_idle_sleep_is_shortened_and_other_sleeps_kept():
    import time

    from corolla.launch.supernode import _patched_time

    shim = _patched_time(0.05)
    t0 = time.monotonic()
    shim.sleep(3)  # Flower's hard-coded idle wait
    shim.sleep(0.1)
    elapsed = time.monotonic() - t0
    assert 0.14 <= elapsed < 1.0
    assert shim.monotonic is time.monotonic
