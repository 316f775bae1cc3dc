"""One `corolla` root logger, configured once per process."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    """Log `corolla.*` to stderr with timestamps; quiet transformers' and datasets' chatter."""
    root = logging.getLogger("corolla")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
        root.propagate = False
    root.setLevel(level or os.environ.get("COROLLA_LOG_LEVEL", "INFO"))
    quiet_libraries()


def quiet_libraries() -> None:
    """Silence progress bars and load reports that would drown the run's own progress."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
