"""The `corolla` command refuses bad input with one clear line and a non-zero exit."""

import subprocess
import sys

import pytest

from server import launch


def corolla(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120,
                          env=launch.flower_env(launch.PROJECT_DIR / ".flwr-test"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["sim", "--out", "/tmp/x", "--set", "num-round=3"], "unknown configuration key(s) ['num-round']; valid keys"),
        (["sim", "--out", "/tmp/x", "--set", "selector=best"], "`selector` = 'best' is not valid"),
        (["client", "--superlink", "127.0.0.1:1", "--data", "/nope.csv"], "silo file '/nope.csv' does not exist"),
        (["trainer", "--data", "/nope.csv"], "silo file '/nope.csv' does not exist"),
        (["client", "--superlink", "127.0.0.1:1", "--rank", "big", "--model", "tiny-bert"], "--rank 'big' is neither"),
        (["report", "/tmp"], "is not a run directory"),
    ],
)
def test_bad_input_exits_with_a_clear_message(args, message):
    out = corolla(*args)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
