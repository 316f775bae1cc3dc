"""The run configuration (`RunConfig`) and the simulated fleet's per-node properties.

A layer above `corolla.strategies`: the components' own option dataclasses declare
their keys, and `RunConfig` gathers them, so choosing a component and configuring it
are checked in one place. The ground floor (`corolla.spec`, `corolla.precision`, ...)
never imports this.
"""

from corolla.config.run import PRESETS, ConfigError, RunConfig, parse_overrides, preset, to_key

__all__ = ["PRESETS", "ConfigError", "RunConfig", "parse_overrides", "preset", "to_key"]
