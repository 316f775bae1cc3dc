"""The code base stays ruff-clean (rules in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path


def test_ruff_clean():
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(root)], capture_output=True, text=True,
                         timeout=120, cwd=root)
    assert out.returncode == 0, out.stdout[-4000:]
