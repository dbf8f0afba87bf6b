"""Flower's deployment engine for real: `spine-fl server` and one `spine-fl client` per site as
separate processes on 127.0.0.1 (each starting a real SuperLink / SuperNode), TLS and SuperNode
authentication on, stopped by PID. Faults are caused for real: a site killed mid-round, the
coordinator killed and restarted, a site that stops answering, an unenrolled key, a client without
TLS, a site with broken data, no coordinator at all, and a modified app bundle."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import tomlkit
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.client.privacy.egress_ledger import LEDGER_FILE, verify
from spine_fl.server.checkpoint import STATE_FILE
from spine_fl.shared.runtime.bundle import build_bundle, project_root
from spine_fl.shared.runtime.credentials import create_site_keys
from spine_fl.shared.runtime.processes import free_loopback_port
from spine_fl.simulations.loopback import build_loopback, wait_for

pytestmark = pytest.mark.slow

RUN = dict(task="tfesi_radiograph", image_size=32, rounds=2, local_epochs=1, batch_size=32, learning_rate=0.3,
           min_sites=3, dp=True, secagg=True)
POLICY = {"epsilon_per_run": 40.0, "epsilon_lifetime": 200.0}


def _metrics(loop) -> dict:
    return json.loads((loop.out_dir / "metrics.json").read_text())


def _site_pulls(loop) -> list[tuple[int, int, float]]:
    """Each site pull through the coordinator's front: its status, bytes answered, seconds taken."""
    log = (loop.root / "coordinator-state" / "front" / "access.log").read_text().splitlines()
    fields = [line.split() for line in log if '"POST /v1/fleet/pull-messages ' in line]
    return [(int(f[6]), int(f[8]), float(f[9])) for f in fields]


def _checkpoint_round(loop) -> int:
    path = loop.root / "coordinator-state" / "checkpoint" / STATE_FILE
    return json.loads(path.read_text())["round"] if path.exists() else 0


@pytest.fixture
def loopback(tmp_path):
    made = []

    def build(run=RUN, n_sites=3):
        loop = build_loopback(tmp_path, run, n_sites, POLICY)
        made.append(loop)
        return loop

    yield build
    for loop in made:
        loop.stop_all()


def test_tls_authenticated_run_with_dp_and_secagg_and_a_site_whose_data_fail(loopback):
    loop = loopback(n_sites=4)
    broken = loop.root / "data" / loop.sites[3] / "clinical.csv"
    pd.read_csv(broken).drop(columns=["nrs_baseline"]).to_csv(broken, index=False)
    server = loop.start_server()
    clients = {s: loop.start_client(s) for s in loop.sites}
    assert clients[loop.sites[3]].wait(120) == 1
    refused = loop.output(loop.sites[3])
    assert "not joining" in refused and "nrs_baseline" in refused
    assert server.wait(420) == 0, loop.output("server")[-3000:]

    metrics = _metrics(loop)
    assert metrics["status"] == "completed" and metrics["engine"] == "deployment"
    assert set(metrics["federated"]["per_site"]) == set(loop.sites[:3])
    for site in loop.sites[:3]:
        assert 0.0 <= metrics["federated"]["per_site"][site]["auroc"] <= 1.0
        privacy = metrics["privacy"]["per_site"][site]
        assert privacy["dp"] and privacy["secagg"] and privacy["epsilon"] > 0
        assert verify(loop.root / "state" / site).ok
    assert metrics["privacy"]["per_site"][loop.sites[3]]["trained"] is False
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["bundle_sha256"] == build_bundle().sha256
    assert "round   2" in loop.output("server")
    # the SuperLink held the sites' empty pulls (shared/runtime/held_pulls.py): without that, a site's pull
    # right after each reply (and ten a second while it waits) is answered "nothing" within milliseconds
    assert "the worker's requests to it over a local socket" in loop.output(loop.sites[0])
    assert "the ServerApp's requests to it over a local socket" in loop.output("server")
    pulls = _site_pulls(loop)
    empty = [seconds for status, size, seconds in pulls if status == 200 and size == 0]
    assert len(pulls) >= 10 and all(seconds >= 1.0 for seconds in empty), sorted(empty)[:10]
    assert (loop.out_dir / "model.pt").exists() and (loop.out_dir / "auroc_per_round.png").exists()

    # the coordinator's model card, from the deployed run's own metrics.json
    report = CliRunner().invoke(app, ["report", str(loop.out_dir)])
    assert report.exit_code == 0, report.output
    card = json.loads((loop.out_dir / "model_card.json").read_text())
    assert card["evidence"] == "metrics_only"
    assert card["comparison"]["federated"]["overall"]["auroc"]["value"] == pytest.approx(metrics["federated"]["auroc"])
    site = loop.sites[0]
    assert card["comparison"]["federated"]["per_site"][site]["auroc"]["value"] == pytest.approx(
        metrics["federated"]["per_site"][site]["auroc"])
    assert f"{metrics['federated']['auroc']:.2f}" in (loop.out_dir / "model_card.html").read_text()
    assert metrics["patients"][site]["test"] == metrics["federated"]["per_site"][site]["n"] > 0


def test_a_site_killed_mid_round_drops_out_and_the_run_finishes_naming_it(loopback):
    loop = loopback({**RUN, "min_sites": 2})
    server = loop.start_server()
    for site in loop.sites:
        loop.start_client(site)
    wait_for(lambda: _checkpoint_round(loop) >= 1, 240, "round 1 to complete")
    victim = loop.sites[2]
    loop.kill(victim)  # SIGKILL by PID; its SuperNode dies with it
    assert server.wait(420) == 0, loop.output("server")[-3000:]
    metrics = _metrics(loop)
    assert metrics["status"] == "completed"
    assert victim in {d["site"] for d in metrics["dropouts"]}
    assert victim not in metrics["rounds"][-1]["per_site"]
    assert set(metrics["rounds"][-1]["per_site"]) == set(loop.sites[:2])


def test_a_site_that_stops_answering_is_left_out_after_reply_wait_seconds(loopback):
    loop = loopback({**RUN, "min_sites": 2, "reply_wait_seconds": 20.0})
    server = loop.start_server()
    for site in loop.sites:
        loop.start_client(site)
    wait_for(lambda: _checkpoint_round(loop) >= 1, 240, "round 1 to complete")
    frozen = loop.sites[2]
    os.kill(loop.processes[frozen].pid, signal.SIGSTOP)  # its worker freezes; its SuperNode stays connected
    try:
        assert server.wait(300) == 0, loop.output("server")[-3000:]
    finally:
        os.kill(loop.processes[frozen].pid, signal.SIGCONT)
    metrics = _metrics(loop)
    # frozen before round 2's setup stage, it is left out of round 2; frozen after it (the checkpoint is
    # polled), SecAgg+ fails round 2 and the round is tried again without it (README "Dropouts")
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2 and metrics["failed_rounds"] in ([], [2])
    assert frozen in {d["site"] for d in metrics["dropouts"]}
    assert set(metrics["rounds"][-1]["per_site"]) == set(loop.sites[:2])
    # waited for once; every later request left it out at once, its first request still unanswered
    waited = [d for d in metrics["dropouts"] if d["site"] == frozen and "unanswered_since_round" not in d]
    assert len(waited) == 1 and len(metrics["dropouts"]) > 1, metrics["dropouts"]


def test_coordinator_killed_after_a_round_resumes_at_the_next_one_with_the_same_model(loopback):
    loop = loopback()
    first = loop.start_server()
    for site in loop.sites:
        loop.start_client(site)
    wait_for(lambda: _checkpoint_round(loop) >= 1, 240, "round 1 to complete")
    loop.kill("server")  # SIGKILL; the SuperLink dies with it
    assert first.returncode != 0
    crashed = loop.sites[0]  # its SuperNode crashes too: the site starts a new one and rejoins
    with contextlib.suppress(ProcessLookupError):  # unless Flower's SuperNode has already given up by itself
        os.kill(int(re.search(r"SuperNode PID (\d+)", loop.output(crashed)).group(1)), signal.SIGKILL)
    done = _checkpoint_round(loop)
    state = json.loads((loop.root / "coordinator-state" / "checkpoint" / STATE_FILE).read_text())
    loop.processes.pop("server")
    second = loop.start_server()
    assert second.wait(420) == 0, loop.output("server")[-3000:]
    assert f"resuming after round {done} from checkpoint sha256 {state['weights_sha256']}" in loop.output("server")
    metrics = _metrics(loop)
    assert metrics["status"] == "completed" and metrics["resumed_after_round"] == done
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert set(metrics["rounds"][-1]["per_site"]) == set(loop.sites)
    assert "starting it again (1 of 20)" in loop.output(crashed)
    for site in loop.sites[1:]:  # their SuperNodes survived: stopped and started afresh (or gave up by themselves)
        assert ("the coordinator restarted (instance" in loop.output(site)
                or "starting it again (1 of 20)" in loop.output(site)), loop.output(site)[-3000:]
    state_dir = loop.root / "coordinator-state"
    assert not (state_dir / "checkpoint").exists()  # a finished run is not resumed again
    recalibration = metrics["calibration"]["rounds"]  # the two histogram releases after round 2, charged too
    for site in loop.sites:  # every round charged exactly once, the one asked again included
        (ledger,) = (loop.root / "state" / site / "privacy").glob("*.jsonl")
        charged = [(e["run_id"], e["round"]) for e in map(json.loads, ledger.read_text().splitlines())]
        assert sorted(charged) == [(state["run_key"], r) for r in (1, 2, *recalibration)], (site, charged)
        assert metrics["ledgers"][site]["ledger_lines"] == 2 and metrics["ledgers"][site]["key_pinned_by"] == "enrolment"
    assert len(list(state_dir.glob("checkpoint-finished-*"))) == 1


def _modified_bundle(tmp_path: Path, marker: Path) -> Path:
    """The released code plus one line that would leave a mark if a site ever imported it."""
    copy = tmp_path / "modified-app"
    shutil.copytree(project_root(), copy, ignore=shutil.ignore_patterns(".git", ".venv", "results", "*.egg-info",
                                                                         "__pycache__", "tests"))
    app = copy / "client" / "app.py"
    app.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n" + app.read_text())
    content = build_bundle(copy).content
    path = tmp_path / "modified.fab"
    path.write_bytes(content)
    return path


def test_at_the_door_an_unenrolled_key_a_client_without_tls_and_a_modified_bundle_are_refused(loopback, tmp_path):
    """One coordinator, offered a modified app bundle: first an unenrolled key and a client without
    TLS try to join (refused; the coordinator keeps waiting) while a site pointed at an address where
    nobody answers explains that, then the enrolled sites join and refuse the bundle before any of
    its code runs."""
    loop = loopback({**RUN, "rounds": 1})
    create_site_keys(loop.root / "credentials", "nowhere")
    loop.write_site("nowhere", loop.root / "data" / loop.sites[2], [build_bundle().sha256])
    nowhere_file = tomlkit.parse(loop.site_file("nowhere").read_text())
    nowhere_file["coordinator"]["address"] = f"127.0.0.1:{free_loopback_port()}"  # nothing listens there
    loop.site_file("nowhere").write_text(tomlkit.dumps(nowhere_file))
    unreachable = loop.start_client("nowhere", attempts=3, retry_seconds=0.2)
    marker = tmp_path / "modified-code-ran"
    fab = _modified_bundle(tmp_path, marker)
    assert "client/app.py" in zipfile.ZipFile(fab).namelist()
    server = loop._start("server", ["server", "--config", str(loop.federation_file), "--bundle", str(fab)])
    wait_for(lambda: "listening on" in loop.output("server"), 60, "the coordinator to listen")
    intruder = "intruder"
    create_site_keys(loop.root / "credentials", intruder)
    loop.write_site(intruder, loop.root / "data" / loop.sites[0], [build_bundle().sha256])
    unenrolled = loop.start_client(intruder, attempts=2)
    refused = loop.start_client(loop.sites[1], insecure=True, name="refused", attempts=2)
    assert refused.wait(120) == 1  # the site's own policy (require_tls, default true) forbids --insecure
    assert "--insecure refused" in loop.output("refused") and "require_tls" in loop.output("refused")
    loop.set_policy(loop.sites[1], require_tls=False)
    plain = loop.start_client(loop.sites[1], insecure=True, name="plain", attempts=2)
    assert unenrolled.wait(120) == 1
    assert plain.wait(120) == 1
    assert server.poll() is None  # nobody enrolled got in; the coordinator is still waiting
    assert "does not accept this site's key (not enrolled)" in loop.output(intruder)
    assert "could not connect to the coordinator" in loop.output("plain")
    assert "No SuperNode found with the given public key" in (loop.root / "coordinator-state" /
                                                              "superlink.log").read_text()
    assert not (loop.out_dir / "metrics.json").exists()
    assert unreachable.wait(120) == 1
    assert loop.output("nowhere").count("not reachable") == 3
    assert "did not answer after 3 attempts" in loop.output("nowhere") and "firewall" in loop.output("nowhere")

    loop.set_policy(loop.sites[1], require_tls=True)
    for site in loop.sites:
        loop.start_client(site)
    assert server.wait(300) == 1, loop.output("server")[-3000:]
    metrics = _metrics(loop)
    assert metrics["status"] == "stopped"
    assert {r["rule"] for r in metrics["privacy"]["refusals"]} == {"allowed_bundles"}
    assert not marker.exists()
    modified_hash = metrics["bundle_sha256"]
    assert modified_hash != build_bundle().sha256
    for site in loop.sites:
        lines = [json.loads(x) for x in (loop.root / "state" / site / LEDGER_FILE).read_text().splitlines()]
        reasons = [x["error"]["reason"] for x in lines if "error" in x]
        assert reasons and all(modified_hash in r for r in reasons)
        assert not (loop.root / "state" / site / "privacy").exists()  # nothing trained
