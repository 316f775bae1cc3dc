"""`wire-dtype`: adapters travel as float16 or bfloat16, and the server still measures every update exactly.

The server rounds what it sends before it keeps it (strategies/base.py `_on_wire`), the
codec and the ClientApp shim write the same bytes, and a reply is read back at float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from bench.harness import read_run, run_inprocess
from corolla import precision
from corolla.client import app as shim
from corolla.proto import flower_arrays, wire
from corolla.server import codec
from corolla.server.records import read_jsonl
from corolla.strategies import FedAvg, FedHL, FLoRA, LoraSpec
from corolla.strategies.base import ClientUpdate
from tests.strategies.helpers import adapter, perturbed

HALF = ("float16", "bfloat16")


@pytest.fixture
def task_identity(monkeypatch):
    """Flower builds a Message only inside a task; give it one (as tests/test_drivers.py does)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    edge = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.0e38, -3.4e38, 1e-40, -1e-45, np.inf, -np.inf, 65504.0,
                     1.0 + 2**-8, 1.0 + 3 * 2**-8], np.float32)  # ties to even, overflow, subnormals
    return np.concatenate([edge, rng.normal(0, 3, 4096).astype(np.float32),
                           rng.normal(0, 1e-3, 4096).astype(np.float32)])


def test_bfloat16_rounding_matches_torch_bit_for_bit():
    x = _values()
    ours = precision.bfloat16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(precision.round_to(x, "bfloat16"), torch.from_numpy(x).bfloat16().float().numpy())
    nan = precision.round_to(np.array([np.nan, -np.nan], np.float32), "bfloat16")
    assert np.isnan(nan).all()


@pytest.mark.parametrize("dtype", precision.WIRE_DTYPES)
def test_bytes_round_trip_is_the_rounding_and_sizes_are_checked(dtype):
    x = _values()[np.isfinite(_values())].reshape(-1, 2)
    data = precision.to_bytes(x, dtype)
    assert len(data) == x.size * precision.ITEMSIZE[dtype]
    back = precision.from_bytes(data, dtype, x.shape)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, precision.round_to(x, dtype))
    with pytest.raises(ValueError, match=f"cannot hold shape \\[3, 2\\] of {dtype}"):
        precision.from_bytes(data[:5], dtype, (3, 2))


def test_rounding_error_is_within_half_an_ulp_of_each_dtype():
    x = np.random.default_rng(1).normal(0, 1, 10_000).astype(np.float32)
    for dtype, mantissa in (("float16", 10), ("bfloat16", 7)):
        rel = np.abs(precision.round_to(x, dtype) - x) / np.abs(x)
        assert rel.max() <= 2.0 ** -(mantissa + 1) * 1.0001


@pytest.mark.parametrize("dtype", precision.WIRE_DTYPES)
def test_records_round_trip_and_count_bytes_at_the_wire_dtype(dtype):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "b": np.ones((5,), np.float32)}
    rec = flower_arrays.to_record(arrays, dtype)
    back = flower_arrays.from_record(rec)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], precision.round_to(v, dtype))
    assert flower_arrays.nbytes(rec) == 17 * precision.ITEMSIZE[dtype] == flower_arrays.nbytes(arrays, dtype)


@pytest.mark.parametrize(("array", "problem"), [
    (Array(dtype="int8", shape=(2,), stype=flower_arrays.RAW_STYPE, data=b"\0\0"), "dtype 'int8'"),
    (Array(dtype="bfloat16", shape=(3,), stype=flower_arrays.RAW_STYPE, data=b"\0\0"), "2 bytes cannot hold shape"),
    (Array(dtype="float32", shape=(1,), stype="pickle", data=b"\0\0\0\0"), "serialization 'pickle'"),
    (Array(np.zeros(2, np.float64)), "dtype float64"),
])
def test_a_malformed_array_is_refused_with_its_name(array, problem):
    with pytest.raises(flower_arrays.ArrayFormatError, match=f"array `w`.*{problem}"):
        flower_arrays.from_array("w", array)


def _identity(agg, ranks):
    sent = [agg.dispatch(r) for r in ranks]
    before = agg.merged()
    agg.aggregate([ClientUpdate(node_id=i, arrays=dict(d.arrays), sent=d, num_examples=5 + i) for i, d in enumerate(sent)])
    return before, agg.merged()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("make", [
    lambda lora: (FedHL(adapter(4, 0), lora, max_rank=4), (1, 2, 4, 4)),
    lambda lora: (FLoRA(adapter(4, 0), lora, max_rank=4), (1, 2, 4)),
    lambda lora: (FedAvg(adapter(4, 0), lora), (4, 4)),
], ids=["fedhl", "flora", "fedavg"])
def test_rounded_dispatches_are_what_is_kept_so_identity_replies_change_nothing(make, dtype):
    lora = LoraSpec(alpha=8, wire_dtype=dtype)
    agg, ranks = make(lora)
    for v in range(2):  # move W away from its start so the SVD's factors are not representable at `dtype`
        ds = [agg.dispatch(r) for r in ranks]
        agg.aggregate([ClientUpdate(node_id=i, arrays=perturbed(d, 7 * v + i, scale=0.3), sent=d, num_examples=9)
                       for i, d in enumerate(ds)])
    d = agg.dispatch(ranks[-1])
    for a in d.arrays.values():
        np.testing.assert_array_equal(a, precision.round_to(a, dtype))  # exactly representable: what travels
    before, after = _identity(agg, ranks)
    for k in before.deltas:
        np.testing.assert_allclose(after.deltas[k], before.deltas[k], rtol=1e-5, atol=1e-6)  # float32 noise; a
        # start kept unrounded would leave ~4e-3 (bfloat16) or ~5e-4 (float16) relative


def test_fedhl_rounded_starts_cost_one_product_per_distinct_start_not_per_client():
    agg = FedHL(adapter(4, 0), LoraSpec(alpha=8, wire_dtype="bfloat16"), max_rank=4)  # fold="background": kept pending
    sent = [agg.dispatch(r) for r in (2, 2, 2, 4, 4)]
    agg.aggregate([ClientUpdate(node_id=i, arrays=dict(d.arrays), sent=d, num_examples=5) for i, d in enumerate(sent)])
    for terms in agg._pending.values():  # 5 returned products, then 2 starts (rank 2 and rank 4), not 5
        assert [c > 0 for c, _, _ in terms] == [True] * 5 + [False] * 2


@pytest.mark.parametrize("dtype", precision.WIRE_DTYPES)
def test_train_message_carries_the_rounded_dispatch_and_the_reply_is_read_back(dtype, task_identity):
    agg = FedHL(adapter(4, 0), LoraSpec(alpha=8, wire_dtype=dtype), max_rank=4)
    d = agg.dispatch(2)
    job = codec.JobConfig(local_steps=1, batch_size=2, lr=0.1, prox_mu=0.0, lora=agg.lora)
    msg = codec.train_message(7, d, job, seed=1, pushed_at=0.0)
    got = flower_arrays.from_record(msg.content[wire.ARRAYS])
    assert msg.content[wire.ARRAYS][flower_arrays.PACKED].dtype == dtype and list(got) == list(d.arrays)
    for k, v in d.arrays.items():
        np.testing.assert_array_equal(got[k], v)
    assert msg.content[wire.CONFIG]["wire-dtype"] == dtype
    assert codec.nbytes(msg.content[wire.ARRAYS]) == codec.nbytes(d.arrays, dtype)


def _reply_to(msg: Message, arrays: ArrayRecord) -> Message:
    content = RecordDict({wire.ARRAYS: arrays,
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 3, wire.MODEL_VERSION: 0, wire.LORA_RANK: 2}),
                          wire.CONFIG: ConfigRecord({wire.FINGERPRINT: "fp"})})
    reply = Message(content, reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = 7  # as tests/fakes.py: the sender Flower would stamp
    return reply


def test_a_reply_in_float64_is_rejected_with_the_reason(task_identity):
    agg = FedHL(adapter(4, 0), LoraSpec(alpha=8), max_rank=4)
    d = agg.dispatch(2)
    msg = codec.train_message(7, d, codec.JobConfig(local_steps=1, batch_size=2, lr=0.1, prox_mu=0.0, lora=agg.lora),
                              seed=1, pushed_at=0.0)
    bad = ArrayRecord(array_dict={k: Array(np.asarray(v, np.float64)) for k, v in d.arrays.items()})
    with pytest.raises(codec.RejectedReply, match=r"node 7: array `.*` has dtype float64; the wire carries only"):
        codec.decode_update(_reply_to(msg, bad), d, 0, "fp")
    good = flower_arrays.to_record(d.arrays, "bfloat16")  # any wire dtype is read, whatever the run's
    assert codec.decode_update(_reply_to(msg, good), d, 0, "fp").num_examples == 3


def test_the_shim_fails_a_job_whose_adapter_float16_cannot_hold():
    with pytest.raises(shim.ClientJobError, match=r"`lora_B` reaches \|x\| = 7e\+04, beyond float16's range \(65504\); "
                                                   r"run with wire-dtype=bfloat16 or float32"):
        shim._reply_record({"lora_B": np.array([1.0, -7e4], np.float32)}, "float16")
    rec = shim._reply_record({"lora_B": np.array([1.0, -7e4], np.float32)}, "bfloat16")
    assert flower_arrays.from_record(rec)["lora_B"][1] == -70144.0  # bfloat16 keeps float32's range


def test_a_bfloat16_federation_halves_the_bytes_and_still_learns(tmp_path):
    """Real trainers (tiny BERT, in-process Grid): same run at float32 and bfloat16."""
    base = {"model": "tiny-bert", "max-length": 32, "num-rounds": 3, "clients-per-round": 3, "local-steps": 4,
            "lr": 5e-3, "ranks": "2,4,8", "lr-decay": 1.0}
    out = {}
    for dtype in ("float32", "bfloat16"):
        run_inprocess({**base, "wire-dtype": dtype}, nodes=3, out_dir=tmp_path / dtype)
        summary, metrics = read_run(tmp_path / dtype)
        assert summary["versions"] == 3 and summary["rejected_updates"] == 0 and summary["failed_replies"] == 0
        out[dtype] = summary, metrics
    (s32, m32), (s16, m16) = out["float32"], out["bfloat16"]
    assert s16["bytes_down"] * 2 == s32["bytes_down"] and s16["bytes_up"] * 2 == s32["bytes_up"]
    assert abs(m16[-1]["loss"] - m32[-1]["loss"]) < 0.05 * m32[-1]["loss"]
    assert m16[-1]["loss"] < m16[0]["loss"]
    updates = read_jsonl(tmp_path / "bfloat16" / "updates.jsonl")
    assert {u["rank"] for u in updates} == {2, 4, 8}


def _packed(names, shapes, data=b"", dtype="float32", count=None, raw_layout=None):
    import json
    import zlib

    layout = raw_layout if raw_layout is not None else zlib.compress(json.dumps({"names": names, "shapes": shapes}).encode())
    n = count if count is not None else len(data) // precision.ITEMSIZE[dtype]
    return ArrayRecord(array_dict={
        flower_arrays.PACKED: Array(dtype=dtype, shape=(n,), stype=flower_arrays.RAW_STYPE, data=data),
        flower_arrays.LAYOUT: Array(dtype="uint8", shape=(len(layout),), stype=flower_arrays.LAYOUT_STYPE, data=layout)})


def test_a_packed_record_is_one_buffer_in_order_with_its_layout():
    arrays = {"z.lora_B": np.full((2, 3), 2.0, np.float32), "a.lora_A": np.arange(4, dtype=np.float32)}
    rec = flower_arrays.to_record(arrays, "float16")
    assert set(rec) == {flower_arrays.PACKED, flower_arrays.LAYOUT}
    assert rec[flower_arrays.PACKED].data == np.concatenate([arrays["z.lora_B"].ravel(), arrays["a.lora_A"]]).astype(
        "<f2").tobytes()
    back = flower_arrays.from_record(rec)
    assert list(back) == ["z.lora_B", "a.lora_A"] and back["z.lora_B"].shape == (2, 3)


@pytest.mark.parametrize(("record", "problem"), [
    (lambda: _packed(["a"], [[2]], b"\0" * 12), "holds 3 values but its layout needs 2"),
    (lambda: _packed(["a", "a"], [[1], [1]], b"\0" * 8), "name each array once"),
    (lambda: _packed(["a"], [[-1]], b""), r"`a` has shape \[-1\]"),
    (lambda: _packed(["a"], [[2]], raw_layout=b"not zlib"), "layout is unreadable"),
    (lambda: _packed(["a"], [[2]], raw_layout=__import__("zlib").compress(b"\0" * (65 * 2**20))), "over 67108864 bytes"),
    (lambda: ArrayRecord(array_dict={flower_arrays.PACKED: Array(np.zeros(2, np.float32))}), "holds exactly"),
])
def test_a_malformed_packed_record_is_refused_with_the_reason(record, problem):
    with pytest.raises(flower_arrays.ArrayFormatError, match=problem):
        flower_arrays.from_record(record())
