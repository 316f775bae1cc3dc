"""The one error type of data reading, in a module of its own so every connector can raise it.

Every way a silo can be wrong ends in `SiloError`, whose message names the problem and
the fix in one line; nothing in `corolla.data` ever returns half-loaded data.
"""

from __future__ import annotations


class SiloError(ValueError):
    """A silo cannot be loaded; the message says why and how to fix it."""
