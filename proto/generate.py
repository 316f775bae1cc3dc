"""Regenerate proto/*_pb2*.py(i) from proto/*.proto: `python -m proto.generate`.

The generated files are committed; tests/test_proto.py regenerates into a temp
folder and fails when the committed code is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "proto").glob("*.proto"))


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Compile every .proto under proto/ into `out_dir`/proto/; return the generated paths."""
    from grpc_tools import protoc  # dev dependency, only needed to regenerate

    (out_dir / "proto").mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *(str(p.relative_to(ROOT)) for p in PROTOS)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out_dir / "proto").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        sys.stdout.write(f"wrote {path.relative_to(ROOT)}\n")
