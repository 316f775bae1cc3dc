"""The Flower app folder that `flwr run` submits: one generated `pyproject.toml`, no code, no data.

corolla is installed on every machine (its dependencies, model files and silos are
provisioned there, never shipped), so the app bundle (FAB) Flower sends to the
SuperLink and on to every site needs to name only the two components and declare
the run-configuration keys. Generating it from `RunConfig` keeps the keys in one
place (the dataclass), and the bundle holds nothing that could leak: no silo, no
key, no run directory (Flower packs every `.json`/`.jsonl`/`.md` it finds in the
folder it is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corolla import __version__
from corolla.config import RunConfig

#: the Flower app's components, as import paths into the installed package
COMPONENTS = {"serverapp": "corolla.server.app:app", "clientapp": "corolla.client.app:app"}


def config_table() -> dict[str, Any]:
    """`[tool.flwr.app.config]`: every run-configuration key with its default, in declaration order.

    Flower fuses `--run-config` into this table and drops keys it does not declare, so
    every key `RunConfig` reads must be here.
    """
    return RunConfig().to_mapping()


def pyproject() -> dict[str, Any]:
    """The app's `pyproject.toml` as a dict (what Flower validates: project, publisher, components, config)."""
    return {
        "project": {"name": "corolla", "version": __version__, "license": "Apache-2.0",
                    "description": "corolla's Flower app (the code is the installed corolla package)",
                    "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "corolla", "components": dict(COMPONENTS), "config": config_table()}}},
    }


def write_app(folder: Path) -> Path:
    """Write the app folder (only `pyproject.toml`) into `folder`, private to its owner; return it."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for extra in folder.iterdir():  # a stale file would travel in the bundle
        if extra.name != "pyproject.toml":
            raise FileExistsError(f"{folder} holds {extra.name}: the app folder must hold only pyproject.toml "
                                  "(everything in it is sent to every site). Remove it or choose another folder.")
    (folder / "pyproject.toml").write_text(tomli_w.dumps(pyproject()))
    return folder
