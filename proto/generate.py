"""Regenerate src/corolla/proto/*_pb2*.py(i) from proto/*.proto: `python proto/generate.py`.

proto/ holds the contract (the .proto sources, what another language's trainer
implements); the package holds the generated Python. The generated files are
committed; tests/test_proto.py regenerates into a temp folder and fails when the
committed code is stale. protoc names imports after the
.proto's path below `-I`, so the sources are compiled from a mirrored
`corolla/proto/` tree: the generated code then imports `corolla.proto.trainer_pb2`,
never a top-level `proto` (the import name of Google's proto-plus).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: where the generated modules live: the package's `corolla.proto`
OUT = ROOT / "src" / "corolla" / "proto"
PROTOS = sorted(HERE.glob("*.proto"))
PACKAGE = Path("corolla") / "proto"


def generate(out_dir: Path = OUT) -> list[Path]:
    """Compile every .proto in this folder into `out_dir`; return the generated paths."""
    from grpc_tools import protoc  # dev dependency, only needed to regenerate

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        (src / PACKAGE).mkdir(parents=True)
        for p in PROTOS:
            shutil.copy(p, src / PACKAGE / p.name)
        build = Path(tmp) / "build"
        build.mkdir()
        args = ["grpc_tools.protoc", f"-I{src}", f"--python_out={build}", f"--pyi_out={build}",
                f"--grpc_python_out={build}", *(str(PACKAGE / p.name) for p in PROTOS)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        produced = []
        for f in sorted((build / PACKAGE).glob("*_pb2*.py*")):
            shutil.copy(f, out_dir / f.name)
            produced.append(out_dir / f.name)
    return produced


if __name__ == "__main__":
    for path in generate():
        sys.stdout.write(f"wrote {path}\n")
