"""A site runs only code it installed: a foreign app bundle is refused by the SuperNode before any of it runs.

Real processes on 127.0.0.1: a plain Flower SuperLink (standing in for a coordinator that
was taken over, or any local user of its Control API) and corolla's SuperNode. The foreign
bundle's ClientApp writes a marker file when imported and when it handles a message; its
ServerApp records the replies it got. With the site's default the marker never appears and
the reply is Flower's FAB-verification error; with `COROLLA_ALLOW_ANY_APP=1` (the site's
explicit choice) the same bundle runs, which shows the test can tell the two apart.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from corolla.launch import processes as launch
from corolla.launch.app_bundle import BundleRefused, check_bundle, write_app
from tests.conftest import processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EVIL_CLIENT = '''
import pathlib
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

pathlib.Path(__file__).with_name("never").touch()  # import-time side effect: a bundle's code ran at all
app = ClientApp()


@app.query()
def query(msg, context):
    pathlib.Path(context.run_config["marker"]).write_text("the foreign bundle ran on the site")
    return Message(RecordDict(), reply_to=msg)
'''

EVIL_SERVER = '''
import json, pathlib, time
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    deadline = time.time() + 60
    while not list(grid.get_node_ids()) and time.time() < deadline:
        time.sleep(0.5)
    msgs = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
            for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=90))
    rows = [{"error": r.has_error(), "code": r.error.code if r.has_error() else 0,
             "reason": r.error.reason if r.has_error() else ""} for r in replies]
    pathlib.Path(context.run_config["out"]).write_text(json.dumps(rows))
'''


def foreign_app(folder: Path) -> Path:
    folder.mkdir()
    (folder / "evil_client.py").write_text(EVIL_CLIENT)
    (folder / "evil_server.py").write_text(EVIL_SERVER)
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "evil"\nversion = "1.0.0"\ndescription = ""\nlicense = "Apache-2.0"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "x"\n[tool.flwr.app.components]\nserverapp = "evil_server:app"\n'
        'clientapp = "evil_client:app"\n[tool.flwr.app.config]\nout = ""\nmarker = ""\n')
    return folder


def run_foreign_bundle(tmp_path: Path, allow: bool) -> tuple[list[dict], Path, str]:
    """Submit the foreign bundle to a plain SuperLink with one corolla SuperNode; (replies, marker, node log)."""
    home = tmp_path / "link"
    fleet = f"127.0.0.1:{launch.free_port()}"
    app = foreign_app(tmp_path / "app")
    out, marker = tmp_path / "replies.json", tmp_path / "marker"
    node_log = tmp_path / "supernode.log"
    with processes() as procs:
        link, address = launch.start_superlink(home, simulation=False, log_path=home / "superlink.log",
                                               fleet_address=fleet, only_corolla=False)
        procs.append(link)
        env = launch.flower_env(tmp_path / "node", {"COROLLA_ALLOW_ANY_APP": "1"} if allow else {})
        procs.append(launch.start([sys.executable, "-m", "corolla.launch.supernode", "--insecure", "--grpc-rere",
                                   "--superlink", fleet, "--host", "127.0.0.1", "--port", str(launch.free_port())],
                                  env, log_path=node_log))
        launch.write_connection(home, "local", address)
        run = subprocess.run([str(launch.BIN / "flwr"), "run", str(app), "local", "--stream", "--run-config",
                              launch.run_config_arg({"out": str(out), "marker": str(marker)})],
                             env=launch.flower_env(home), capture_output=True, text=True, timeout=200)
        assert out.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    return json.loads(out.read_text()), marker, node_log.read_text()


def test_a_foreign_bundle_is_refused_and_nothing_of_it_runs_on_the_site(tmp_path):
    replies, marker, log = run_foreign_bundle(tmp_path, allow=False)
    assert len(replies) == 1 and replies[0]["error"], replies
    assert "verif" in replies[0]["reason"].lower(), replies  # Flower's FAB-verification error reply
    assert not marker.exists()
    assert not list((tmp_path / "node").rglob("never"))  # not even imported: the bundle was never stored
    assert "refused an app bundle: the app bundle holds files besides pyproject.toml" in log


def test_the_same_bundle_runs_where_the_site_chose_to_allow_any_app(tmp_path):
    replies, marker, _ = run_foreign_bundle(tmp_path, allow=True)
    assert replies == [{"error": False, "code": 0, "reason": ""}]
    assert marker.read_text() == "the foreign bundle ran on the site"


def test_corollas_superlink_refuses_to_start_a_foreign_bundle(tmp_path):
    """The server host's side: `flwr run` of the foreign bundle against corolla's SuperLink is refused at submission."""
    home = tmp_path / "link"
    app = foreign_app(tmp_path / "app")
    with processes() as procs:
        link, address = launch.start_superlink(home, simulation=False, log_path=home / "superlink.log")
        procs.append(link)
        launch.write_connection(home, "local", address)
        run = subprocess.run([str(launch.BIN / "flwr"), "run", str(app), "local", "--run-config",
                              launch.run_config_arg({"out": "x", "marker": "y"})],
                             env=launch.flower_env(home), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", run.stdout + run.stderr).split())  # flwr prints errors in a box
    assert "corolla refused the run: the app bundle holds files besides pyproject.toml" in said
    assert "corolla refused the run" in (home / "superlink.log").read_text()


def test_check_bundle_admits_corollas_own_bundle_and_refuses_the_rest(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    own = write_app(tmp_path / "own")
    check_bundle(build_fab_from_disk(own))
    text = (own / "pyproject.toml").read_text()
    cases = {
        "components": text.replace("corolla.client.app:app", "evil:app"),
        "dependencies": text.replace("dependencies = []", 'dependencies = ["evil"]'),
        "configuration keys": text.replace('[tool.flwr.app.config]\n', '[tool.flwr.app.config]\nbackdoor = 1\n'),
    }
    for what, changed in cases.items():
        folder = tmp_path / what.replace(" ", "-")
        folder.mkdir()
        (folder / "pyproject.toml").write_text(changed)
        with pytest.raises(BundleRefused, match=what):
            check_bundle(build_fab_from_disk(folder))
    with pytest.raises(BundleRefused, match="not a readable zip"):
        check_bundle(b"not a zip")
