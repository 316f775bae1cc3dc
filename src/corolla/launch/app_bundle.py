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


class BundleRefused(ValueError):
    """An app bundle is not corolla's: it could run code that the receiving machine never installed."""


def check_bundle(content: bytes) -> None:
    """Raise BundleRefused unless `content` (a FAB: a zip) is a corolla app bundle and nothing else.

    What a site runs is then what its operator installed: the bundle may hold only the one
    `pyproject.toml`, its components must be corolla's (`COMPONENTS`), it may ask for no
    dependencies, and its configuration keys must be `RunConfig`'s. The values of those
    keys are data every run validates. Flower 1.39 signs and verifies bundles only for apps
    fetched from its hub, so a bundle built by `flwr run` cannot be signed: this is the
    check a site can make on its own.
    """
    import io
    import tomllib
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = sorted(n for n in fab.namelist() if not n.startswith(".info/"))
            if names != ["pyproject.toml"]:
                extra = [n for n in names if n != "pyproject.toml"][:5]
                raise BundleRefused(f"the app bundle holds files besides pyproject.toml ({extra}); a corolla bundle "
                                    "carries no code")
            conf = tomllib.loads(fab.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BundleRefused(f"the app bundle is not a readable zip with a pyproject.toml ({e})") from None
    app = conf.get("tool", {}).get("flwr", {}).get("app", {})
    if app.get("components") != COMPONENTS:
        raise BundleRefused(f"the app bundle's components {app.get('components')} are not corolla's {COMPONENTS}")
    if conf.get("project", {}).get("dependencies"):
        raise BundleRefused("the app bundle asks for dependencies; a corolla site installs nothing at run time")
    unknown = sorted(set(app.get("config", {})) - set(config_table()))
    if unknown:
        raise BundleRefused(f"the app bundle declares configuration keys corolla does not have: {unknown[:5]}")
