"""Bytes on the wire per adapter at each `wire-dtype`, against the raw adapter bytes at that dtype.

For the embedded MiniLM classifier and SmolLM2-135M (causal LM), at ranks 4/8/16/32, the
real train message the server sends (`server/codec.train_message`) and the real reply the
ClientApp shim builds (`client/app._reply_record`) are cut into Flower's objects, and each
object is wrapped in the `PushObjectRequest` Flower sends for it (node, run id, object id,
session id, content): the sum of those requests' protobuf sizes is what crosses the network
for one update. Raw bytes = Σ elements × itemsize (the physical floor at that dtype). The
adapter values are random (σ = 0.02), so no two chunks are equal and nothing is deduplicated.
Also reported: the time to encode and decode one update (the bfloat16 conversion is numpy
bit arithmetic, corolla's own).

    .venv/bin/python bench/wire_bytes.py [--ranks 4 8 16 32] [--models minilm smollm2]

Target: bytes per update ≤ 1.05 × the raw adapter bytes at that dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import RESULTS  # noqa: E402
from corolla import precision  # noqa: E402

TARGET = 1.05
MODELS = {"minilm": {"task": "text-classification", "model": "minilm"},
          "smollm2": {"task": "causal-lm", "model": "smollm2"}}


def wire_size(message) -> tuple[int, int]:
    """(bytes of every PushObjectRequest for `message`'s objects, object count)."""
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(message)
    node, session = Node(node_id=2**63 - 1), str(uuid.uuid4())
    total = sum(PushObjectRequest(node=node, run_id=2**63 - 1, object_id=oid, object_content=obj.deflate(),
                                  session_id=session).ByteSize() for oid, obj in objects.items())
    return total, len(objects)


def measure(model: str, ranks: list[int]) -> list[dict]:
    from flwr.supercore.task_identity import TaskIdentity

    from corolla.client import app as shim
    from corolla.learning.tasks import build_task
    from corolla.learning.train_loop import initial_adapter
    from corolla.proto import flower_arrays, wire
    from corolla.server import codec
    from corolla.spec import LoraSpec, TaskSpec
    from corolla.strategies import Dispatch

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # Flower builds messages in a task
        setattr(TaskIdentity, name, value)
    task = build_task(TaskSpec(**MODELS[model]))
    rows = []
    for rank in ranks:
        layout = initial_adapter(task, rank, LoraSpec(), seed=0)
        rng = np.random.default_rng(rank)
        arrays = {k: rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in layout.items()}
        elements = sum(v.size for v in arrays.values())
        for dtype in precision.WIRE_DTYPES:
            lora = LoraSpec(wire_dtype=dtype)
            sent = Dispatch(rank=rank, version=3, arrays={k: precision.round_to(v, dtype) for k, v in arrays.items()})
            job = codec.JobConfig(local_steps=10, batch_size=16, lr=3e-3, prox_mu=0.0, lora=lora)
            t0 = time.perf_counter()
            down = codec.train_message(12345, sent, job, seed=1, pushed_at=time.time())
            t1 = time.perf_counter()
            record = shim._reply_record(arrays, dtype)
            t2 = time.perf_counter()
            flower_arrays.from_record(record)
            t3 = time.perf_counter()
            from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

            up = Message(RecordDict({wire.ARRAYS: record, wire.METRICS: shim._metadata_metrics(
                shim.trainer_pb2.UpdateMetadata(num_examples=100, base_version=3, rank=rank)),
                wire.CONFIG: ConfigRecord({wire.FINGERPRINT: "f" * 16})}), reply_to=down)
            raw = elements * precision.ITEMSIZE[dtype]
            # the baseline: Flower's usual form, one Array per state-dict name (npy for float32/16, raw for bfloat16)
            per_name = ArrayRecord(array_dict={
                k: (flower_arrays.Array.from_numpy_ndarray(precision.round_to(v, dtype).astype(dtype))
                    if dtype != "bfloat16" else flower_arrays.Array(dtype=dtype, shape=v.shape,
                                                                    stype=flower_arrays.RAW_STYPE,
                                                                    data=precision.to_bytes(v, dtype)))
                for k, v in arrays.items()})
            baseline = Message(RecordDict({wire.ARRAYS: per_name, wire.METRICS: up.content[wire.METRICS],
                                           wire.CONFIG: up.content[wire.CONFIG]}), reply_to=down)
            down_b, down_objs = wire_size(down)
            up_b, up_objs = wire_size(up)
            rows.append({"model": model, "rank": rank, "dtype": dtype, "arrays": len(arrays), "elements": elements,
                         "raw_bytes": raw, "down_bytes": down_b, "up_bytes": up_b, "down_ratio": down_b / raw,
                         "up_ratio": up_b / raw, "per_name_ratio": wire_size(baseline)[0] / raw,
                         "objects_down": down_objs, "objects_up": up_objs,
                         "encode_down_ms": 1e3 * (t1 - t0), "encode_up_ms": 1e3 * (t2 - t1),
                         "decode_ms": 1e3 * (t3 - t2)})
            r = rows[-1]
            print(f"{model:8s} r={rank:<3d} {dtype:9s} raw {raw / 1e3:9.1f} kB  down {r['down_ratio']:.4f}x  "
                  f"up {r['up_ratio']:.4f}x  per-name {r['per_name_ratio']:.4f}x  "
                  f"encode {r['encode_up_ms']:.1f} ms  decode {r['decode_ms']:.1f} ms",
                  flush=True)
    return rows


def report(rows: list[dict]) -> str:
    lines = ["# Bytes on the wire per adapter, by `wire-dtype`", "",
             "Each update's Flower objects, wrapped in the PushObjectRequest Flower sends for each, against the raw "
             "adapter bytes at that dtype (elements × itemsize). Random adapter values, so nothing is deduplicated. "
             "`bench/wire_bytes.py`.", "",
             "`per-name / raw`: the same reply in Flower's usual form, one Array per state-dict name (what corolla "
             "sent before packing), measured in the same run.", "",
             "| model | rank | dtype | arrays | raw kB | down / raw | up / raw | per-name / raw | vs float32 (up) "
             "| encode up ms | decode ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    f32 = {(r["model"], r["rank"]): r["up_bytes"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        lines.append(f"| {r['model']} | {r['rank']} | {r['dtype']} | {r['arrays']} | {r['raw_bytes'] / 1e3:.1f} | "
                     f"{r['down_ratio']:.4f} | {r['up_ratio']:.4f} | {r['per_name_ratio']:.4f} | "
                     f"{r['up_bytes'] / f32[(r['model'], r['rank'])]:.3f}"
                     f" | {r['encode_up_ms']:.1f} | {r['decode_ms']:.1f} |")
    worst = max(rows, key=lambda r: max(r["down_ratio"], r["up_ratio"]))
    ok = all(max(r["down_ratio"], r["up_ratio"]) <= TARGET for r in rows)
    lines += ["", f"- Worst ratio {max(worst['down_ratio'], worst['up_ratio']):.4f} ({worst['model']}, rank "
              f"{worst['rank']}, {worst['dtype']}): target ≤ {TARGET} {'met' if ok else 'MISSED'} in all "
              f"{len(rows)} cases."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--name", default="wire_bytes")
    args = p.parse_args()
    rows = [row for m in args.models for row in measure(m, args.ranks)]
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    text = report(rows)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
