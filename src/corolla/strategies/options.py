"""Typed component options and the registries that map configuration names to components.

Each aggregator, selector, asynchronous rule, staleness weight and server optimizer
declares a frozen config dataclass beside its code whose fields are `option(...)`s
tied to run-configuration keys. A `Registry` maps a name to (class, config class,
help): valid choices, per-key help, bounds and defaults all come from here — the
run configuration and `corolla keys` read them, nothing lists them twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def option(default: Any, *, key: str | None, help: str, low: float | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A field of a component's config dataclass, tied to its run-configuration key.

    `key` is the kebab-case key of `[tool.flwr.app.config]` that sets it (None: not
    exposed to the run configuration). The registries read `help`, `low` and
    `choices` from here, so a component documents and bounds its own options once.
    """
    return field(default=default, metadata={"key": key, "help": help, "low": low, "choices": choices})


@dataclass(frozen=True)
class Option:
    """One run-configuration key a component reads: its default, bounds, help and the components that read it."""

    key: str
    default: Any
    help: str
    low: float | None
    choices: tuple[str, ...] | None
    owners: tuple[str, ...]  # "kind=name", e.g. "aggregation=fedhl"


@dataclass(frozen=True)
class Registration(Generic[T]):
    """A named component: its class, its config dataclass (None: no options) and one line of help."""

    name: str
    cls: type[T]
    config: type | None
    help: str


class Registry(Generic[T]):
    """Name → component for one kind (aggregation, selector, async rule, staleness, server optimizer)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # the run-configuration key that chooses among these
        self._entries: dict[str, Registration[T]] = {}

    def register(self, name: str, cls: type[T], config: type | None = None, help: str = "") -> None:
        """Add a component; a name registered twice is a programming error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Registration(name, cls, config, help)

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Registration[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"`{self.kind}` = {name!r} is not valid; choose one of {list(self._entries)}.") from None

    def keys(self, name: str) -> tuple[str, ...]:
        """The run-configuration keys component `name` reads."""
        cfg = self[name].config
        if cfg is None:
            return ()
        return tuple(f.metadata["key"] for f in dataclasses.fields(cfg) if f.metadata.get("key"))

    def config(self, name: str, values: Mapping[str, Any]) -> Any:
        """Build component `name`'s config from kebab-case run-configuration `values` (missing keys: defaults)."""
        cfg = self[name].config
        if cfg is None:
            return None
        kwargs = {f.name: values[f.metadata["key"]] for f in dataclasses.fields(cfg)
                  if f.metadata.get("key") and f.metadata["key"] in values}
        return cfg(**kwargs)

    def options(self) -> dict[str, Option]:
        """Every run-configuration key of every component of this kind, merged across the components that share it."""
        out: dict[str, Option] = {}
        for reg in self._entries.values():
            if reg.config is None:
                continue
            for f in dataclasses.fields(reg.config):
                key = f.metadata.get("key")
                if not key:
                    continue
                owner = f"{self.kind}={reg.name}"
                if key in out:
                    if out[key].default != f.default:
                        raise ValueError(f"key `{key}` has default {out[key].default!r} in {out[key].owners} but "
                                         f"{f.default!r} in {owner}; shared keys need one default")
                    out[key] = dataclasses.replace(out[key], owners=(*out[key].owners, owner))
                else:
                    m = f.metadata
                    out[key] = Option(key, f.default, m["help"], m.get("low"), m.get("choices"), (owner,))
        return out

    def summary(self) -> str:
        """'name: help' lines for `corolla keys`."""
        return "\n".join(f"  {r.name:14} {r.help}" for r in self._entries.values())
