import filecmp
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from corolla.proto import trainer_pb2, wire

_spec = importlib.util.spec_from_file_location("generate", Path(__file__).resolve().parent.parent / "proto" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def test_generated_code_is_fresh(tmp_path):
    produced = generate.generate(tmp_path)
    assert len(generate.PROTOS) == 1
    assert [p.name for p in produced] == ["trainer_pb2.py", "trainer_pb2.pyi", "trainer_pb2_grpc.py"]
    for p in produced:
        committed = generate.OUT / p.name
        assert filecmp.cmp(p, committed, shallow=False), f"{committed} is stale: run `python proto/generate.py`"


def test_tensor_round_trip_float32_and_float16():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "h": np.ones((4,), np.float16)}
    out = wire.decode_tensors(wire.encode_tensors(arrays))
    np.testing.assert_array_equal(out["a"], arrays["a"])
    assert out["h"].dtype == np.float32 and out["h"].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "tensor,match",
    [
        (trainer_pb2.Tensor(name="x", shape=[2], dtype="bfloat16", data=b"\0" * 4), "only"),
        (trainer_pb2.Tensor(name="x", shape=[3], dtype="float32", data=b"\0" * 8), "has 8 bytes .* needs 12"),
        (trainer_pb2.Tensor(name="x", shape=[1], dtype="float32", data=b"\0" * 3), "has 3 bytes"),
    ],
)
def test_malformed_tensors_are_refused(tensor, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode_tensors([tensor])


def test_duplicate_tensor_names_are_refused():
    t = trainer_pb2.Tensor(name="x", shape=[1], dtype="float32", data=b"\0" * 4)
    with pytest.raises(wire.WireError, match="twice"):
        wire.decode_tensors([t, t])
