"""Packaging and layering: one `corolla` namespace in site-packages, a torch-free core, one direction of imports."""

from __future__ import annotations

import ast
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the folders that make up the package, by their import name
PACKAGES = {"core": "corolla", "server": "corolla.server", "client": "corolla.client", "strategies": "corolla.strategies",
            "proto": "corolla.proto"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, timeout=300, capture_output=True)
    (whl,) = out.glob("corolla-*.whl")
    return whl


def test_the_wheel_holds_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
        names = z.namelist()
    assert tops == {"corolla"}
    for sub in ("server", "client", "client/tasks", "strategies", "proto"):
        assert f"corolla/{sub}/__init__.py" in names
    assert "corolla/proto/trainer.proto" in names and "corolla/proto/trainer_pb2_grpc.py" in names


def test_installs_beside_proto_plus_and_both_import(wheel, tmp_path):
    """proto-plus (a dependency of Google's client libraries) imports as `proto`; corolla must not take that name."""
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    py = env / "bin" / "python"
    # protobuf and numpy from the project's own environment's versions; proto-plus from the registry
    import google.protobuf
    import numpy

    pins = [f"protobuf=={google.protobuf.__version__}", f"numpy=={numpy.__version__}", "proto-plus"]
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins], check=True,
                   timeout=600, capture_output=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=300, capture_output=True)
    code = ("import proto, corolla.proto.trainer_pb2 as pb, corolla.proto.wire as w, corolla.config as c; "
            "assert hasattr(proto, 'Message') and hasattr(proto, 'Field'), proto.__file__; "
            "assert pb.Tensor(name='x').name == 'x'; print(w.SOFTWARE_VERSION, c.RunConfig().aggregation)")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    import corolla

    assert out.stdout.split() == [corolla.__version__, "auto"]


LIGHT = [
    ["-m", "corolla.cli", "options"],
    ["-m", "corolla.cli", "status", "{run}"],
    ["-m", "corolla.cli", "report", "{run}"],
    ["-c", "import corolla.client.app, corolla.server.federation, corolla.server.sync_driver, "
           "corolla.server.async_driver, corolla.strategies"],
]


@pytest.mark.parametrize("argv", LIGHT, ids=["options", "status", "report", "shim+server+strategies"])
def test_light_commands_and_the_shim_start_without_torch(argv, tmp_path):
    """`corolla options/status/report`, the ClientApp shim and the server's drivers never import torch or transformers."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"version": 0, "wall_s": 0.0, "accuracy": 0.5, "loss": 1.0, "bytes_up": 0, '
                                       '"bytes_down": 0, "clients": 0}\n')
    argv = [a.replace("{run}", str(run)) for a in argv]
    probe = ("import sys, runpy; sys.argv = ['x', *sys.argv[1:]]; "
             "import builtins; real = builtins.__import__\n"
             "def guard(name, *a, **k):\n"
             "    if name.split('.')[0] in ('torch', 'transformers', 'peft', 'datasets'):\n"
             "        raise ImportError('forbidden import of ' + name)\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = guard\n")
    if argv[0] == "-m":
        code = probe + f"sys.argv = ['corolla', *{argv[2:]!r}]\nrunpy.run_module({argv[1]!r}, run_name='__main__')"
    else:
        code = probe + argv[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "forbidden import" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == 0, out.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    """Every `corolla...` module a file imports (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("corolla"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("corolla"))
    return found


@pytest.mark.parametrize("folder,forbidden", [
    ("client", ("corolla.server",)),
    ("strategies", ("corolla.server", "corolla.client", "corolla.proto", "corolla.config", "corolla.launch",
                    "corolla.cli")),
    ("proto", ("corolla.server", "corolla.client", "corolla.strategies")),
    ("core", ("corolla.server", "corolla.client")),
])
def test_dependencies_point_one_way(folder, forbidden):
    """client never imports server; strategies import only themselves (and the shared spec); core imports neither side.

    The CLI (core/cli.py) is the one exception: it dispatches each subcommand to its side, lazily.
    """
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.name == "cli.py" and folder == "core":
            continue
        bad += [f"{path.relative_to(ROOT)} imports {m}" for m in _imports(path) if m.startswith(forbidden)]
    assert not bad, bad
