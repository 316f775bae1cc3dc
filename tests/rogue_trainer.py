"""A rogue silo's trainer for tests/test_rogue_silo.py: honest Describe, corrupted Train replies.

`python -m tests.rogue_trainer --data silo.csv --rank 4 --model tiny-bert ...` (the trainer's own
options) loads the model and the silo like `corolla trainer`, prints `corolla-trainer listening on
HOST:PORT`, and serves until SIGTERM. Describe is answered honestly; every Train job is trained
honestly, then its reply tells the next lie of `LIES`, in order, cycling.
"""

from __future__ import annotations

import argparse
import sys

import grpc
import numpy as np

from corolla.client.args import add_trainer_args
from corolla.client.trainer_process import build_trainer, serve_until_signalled
from corolla.client.trainer_service import TrainerServicer, serve
from corolla.proto import trainer_pb2, wire

#: one lie per train job, in this order: what each does to an honestly trained reply
LIES = {
    "scale": "multiply every array it returns by 10^4 (LoRA factors and the classifier head)",
    "examples": "claim 10^12 training examples",
    "loss": "report a negative mean loss (-1)",
    "nan": "put a NaN in the first LoRA A factor",
    "shape": "drop the last row of the first LoRA A factor (a wrong shape)",
    "extra": "add a tensor the server never sent (`backdoor.weight`)",
    "rank": "claim one rank more than it was sent",
    "version": "claim the version before the one it was sent",
}
SCALE = 1e4
CLAIMED_EXAMPLES = 10**12
EXTRA_TENSOR = "backdoor.weight"


def tell(reply: trainer_pb2.TrainReply, lie: str) -> trainer_pb2.TrainReply:
    """The honest `reply` with `lie` told (a copy); `a+b` tells both."""
    if "+" in lie:
        for part in lie.split("+"):
            reply = tell(reply, part)
        return reply
    out = trainer_pb2.TrainReply()
    out.CopyFrom(reply)
    arrays = wire.decode_tensors(out.arrays)
    first_a = sorted(k for k in arrays if k.endswith(".lora_A.weight"))[0]
    meta = out.metadata
    if lie == "scale":
        arrays = {k: v * np.float32(SCALE) for k, v in arrays.items()}
    elif lie == "examples":
        meta.num_examples = CLAIMED_EXAMPLES
    elif lie == "loss":
        meta.loss_mean = -1.0
    elif lie == "nan":
        arrays[first_a][0, 0] = np.nan
    elif lie == "shape":
        arrays[first_a] = arrays[first_a][:-1]
    elif lie == "extra":
        arrays[EXTRA_TENSOR] = np.ones((4, 4), np.float32)
    elif lie == "rank":
        meta.rank += 1
    elif lie == "version":
        meta.base_version -= 1
    del out.arrays[:]
    out.arrays.extend(wire.encode_tensors(arrays))
    return out


class RogueServicer(TrainerServicer):
    """The trainer's servicer, whose Train replies lie (one lie of `LIES` per job, in order)."""

    #: the lies told, one per job, cycling (`--lies`; default: every lie of `LIES`)
    lies: list[str] = list(LIES)

    def __init__(self, trainer: object) -> None:
        super().__init__(trainer)  # type: ignore[arg-type]
        self.jobs = 0

    def Train(self, request: trainer_pb2.TrainRequest, context: grpc.ServicerContext) -> trainer_pb2.TrainReply:  # noqa: N802
        """Train honestly, then lie."""
        reply = super().Train(request, context)
        lie = self.lies[self.jobs % len(self.lies)]
        self.jobs += 1
        print(f"rogue: job {self.jobs} (version {request.base_version}): {lie}", flush=True)
        return tell(reply, lie)


def main(argv: list[str] | None = None) -> int:
    """Serve the rogue trainer until SIGTERM."""
    p = argparse.ArgumentParser(prog="rogue trainer", description=__doc__)
    add_trainer_args(p)
    p.add_argument("--lies", default=",".join(LIES), help="comma-separated lies, one per job, cycling; a+b tells both")
    args = p.parse_args(argv)
    RogueServicer.lies = args.lies.split(",")
    server, port = serve(build_trainer(args), "127.0.0.1:0", servicer=RogueServicer)
    print(f"corolla-trainer listening on 127.0.0.1:{port}", flush=True)
    serve_until_signalled(server, grace=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
