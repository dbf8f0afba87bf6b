"""The privacy core end to end on Flower's simulation engine: DP accounting, budgets, policies,
SecAgg+ vs plain FedAvg, what leaves a site, and a process killed mid-run."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import tomlkit
import torch
from privacy_reference import independent_epsilon

from spine_fl.client.privacy.egress_ledger import verify
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger
from spine_fl.server.secure_aggregation import quantization_error_bound
from spine_fl.shared import protocol
from spine_fl.shared.config import load_scenario
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.models.registry import build_model
from spine_fl.shared.training.accounting import epsilon
from spine_fl.shared.training.calibration import LOCATE_NOISE_STD, NOISE_STD
from spine_fl.simulations.runner import simulate

pytestmark = pytest.mark.slow

BASE_RUN = {"task": "rbp_tabular", "rounds": 3, "local_epochs": 1, "batch_size": 16, "learning_rate": 0.3,
            "noise_multiplier": 1.0, "min_sites": 3, "seed": 1}


def scenario_file(path: Path, run: dict | None = None, policy: dict | None = None, state_dir: Path | None = None,
                  task_modalities_seed: int = 11) -> Path:
    scenario = {"name": "privacy-test",
                "consortium": {"source": "synthetic", "sites": 3, "seed": task_modalities_seed},
                "run": {**BASE_RUN, **(run or {})}, "policy": policy or {}}
    if state_dir is not None:
        scenario["simulation"] = {"state_dir": str(state_dir)}
    path.write_text(tomlkit.dumps(scenario))
    return path


def run_scenario(tmp: Path, name: str, **kwargs) -> dict:
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    scenario = load_scenario(scenario_file(out / "scenario.toml", **kwargs))
    return simulate(scenario, out)


def test_dp_run_reports_epsilon_that_dp_accounting_confirms(tmp_path: Path) -> None:
    metrics = run_scenario(tmp_path, "dp")
    assert metrics["status"] == "completed"
    for site, p in metrics["privacy"]["per_site"].items():
        assert p["dp"] and p["secagg"] and p["accountant"] == "rdp"
        assert p["steps"] == 3 * round(1 / p["sample_rate"])
        independent = independent_epsilon(p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"], "rdp")
        assert p["epsilon"] == pytest.approx(independent, rel=0.02), site
        assert p["delta"] < 1 / (metrics["patients"][site]["train"])
        assert p["epsilon_lifetime"] == pytest.approx(p["epsilon"])
        assert verify(tmp_path / "dp" / "site-state" / site).ok


def test_second_run_composes_lifetime_epsilon_across_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = run_scenario(tmp_path, "first", state_dir=state, run={"rounds": 2})
    second = run_scenario(tmp_path, "second", state_dir=state, run={"rounds": 2})
    for site in first["sites"]:
        a, b = first["privacy"]["per_site"][site], second["privacy"]["per_site"][site]
        assert a["epsilon_total"] > a["epsilon"]  # the first run's recalibration histograms were charged too
        both = epsilon([(a["noise_multiplier"], a["sample_rate"], a["steps"]), (LOCATE_NOISE_STD, 1.0, 1),
                        (NOISE_STD, 1.0, 1),
                        (b["noise_multiplier"], b["sample_rate"], b["steps"])], b["delta"])
        assert b["epsilon"] == pytest.approx(a["epsilon"], rel=1e-6)  # same mechanism each run
        assert b["epsilon_lifetime"] == pytest.approx(both, rel=1e-6)
        assert b["epsilon_lifetime"] > b["epsilon"] * 1.2


def test_site_over_budget_refuses_and_the_run_goes_on(tmp_path: Path) -> None:
    metrics = run_scenario(tmp_path, "budget", run={"rounds": 4, "min_sites": 2},
                           policy={"seoul": {"epsilon_per_run": 3.0}})
    assert metrics["status"] == "completed"
    refusals = [r for r in metrics["privacy"]["refusals"] if r["site"] == "seoul"]
    assert refusals, metrics["privacy"]
    first = refusals[0]
    assert first["rule"] == "epsilon_per_run" and first["budget"] == 3.0 and first["round"] >= 2
    assert first["epsilon_after"] > 3.0 >= first["epsilon_spent"] > 0
    assert all(r["trained"] for r in metrics["rounds"])  # the other two sites carried every round
    assert 0 < metrics["privacy"]["per_site"]["seoul"]["epsilon"] <= 3.0


def test_policy_violations_are_refused_with_the_rule_named(tmp_path: Path) -> None:
    metrics = run_scenario(
        tmp_path, "policy", run={"secagg": False, "rounds": 2},
        policy={"seoul": {"require_secagg": False, "min_noise_multiplier": 2.0},
                "zurich": {"require_secagg": False, "allowed_tasks": ["tfesi_mri"]}})
    rules = {r["site"]: r["rule"] for r in metrics["privacy"]["refusals"]}
    assert rules == {"leiden": "require_secagg", "seoul": "min_noise_multiplier", "zurich": "allowed_tasks"}
    assert metrics["status"] == "stopped" and "fewer than min_sites" in metrics["stop_reason"]
    assert not any(p["trained"] for p in metrics["privacy"]["per_site"].values())
    for site in metrics["sites"]:  # refused before any training: no privacy spent
        assert not list((tmp_path / "policy" / "site-state" / site).glob("privacy/*.jsonl"))


def test_an_edited_task_file_is_refused_by_a_site_that_approved_the_old_hash(tmp_path: Path) -> None:
    """The approval is of one definition: a site that allows rbp_tabular@<old sha> refuses the run when the
    coordinator's task file was edited since (new sha), naming both hashes, before anything is spent."""
    from spine_fl.shared.contract.task_file import load_task_file, task_sha256
    from spine_fl.shared.contract.tasks import SHIPPED_SHA256, shipped_task_files

    old = SHIPPED_SHA256["rbp_tabular"]
    edited = tmp_path / "rbp_edited.toml"
    text = shipped_task_files()["rbp_tabular"].read_text()
    assert "scale = 3.5" in text
    edited.write_text(text.replace("scale = 3.5", "scale = 4.0", 1))  # one predictor's scaling changed
    new = task_sha256(load_task_file(edited))
    assert new != old
    metrics = run_scenario(tmp_path, "edited", run={"task": str(edited), "secagg": False, "rounds": 1},
                           policy={"require_secagg": False, "zurich": {"allowed_tasks": [f"rbp_tabular@{old}"]}})
    [refusal] = [r for r in metrics["privacy"]["refusals"] if r["site"] == "zurich"]
    assert refusal["rule"] == "allowed_tasks"
    assert f"definition sha256 {new}" in refusal["message"] and f"only with sha256 {old}" in refusal["message"]
    assert f'"rbp_tabular@{new}"' in refusal["message"]  # what to add to accept the edited definition
    assert not any(r["site"] != "zurich" for r in metrics["privacy"]["refusals"])  # the others approve the file
    assert metrics["status"] == "stopped" and "fewer than min_sites" in metrics["stop_reason"]
    assert not any(p["trained"] for p in metrics["privacy"]["per_site"].values())
    for site in metrics["sites"]:  # refused in the pre-flight: nobody trained, no privacy spent
        assert not list((tmp_path / "edited" / "site-state" / site).glob("privacy/*.jsonl"))


def _as_trained(bundle: dict) -> dict:
    """model.pt's weights with the recalibration map taken out of the output layer again (each run fits
    its own map on noisy histograms; the aggregation is what is compared here)."""
    state = dict(bundle["state_dict"])
    calibration = bundle.get("calibration") or {}
    if calibration.get("folded"):
        *_, weight, bias = state  # the output layer (shared/training/local.py output_layer) comes last
        a, b = calibration["a"], calibration["b"]
        state[weight], state[bias] = state[weight] / a, (state[bias] - b) / a
    return state


def test_secagg_aggregate_equals_plain_fedavg_within_quantisation(tmp_path: Path) -> None:
    run = {"dp": False, "rounds": 1, "optimizer": "adam", "learning_rate": 0.01}
    policy = {"require_dp": False, "require_secagg": False}
    plain = run_scenario(tmp_path, "plain", run={**run, "secagg": False}, policy=policy)
    secure = run_scenario(tmp_path, "secure", run={**run, "secagg": True}, policy=policy)
    assert plain["privacy"]["secagg"]["enabled"] is False and secure["privacy"]["secagg"]["enabled"] is True
    a, b = (_as_trained(torch.load(tmp_path / name / "model.pt", weights_only=True)) for name in ("plain", "secure"))
    start = build_model(get_task("rbp_tabular"), 1).state_dict()
    smallest = min(p["train"] for p in plain["patients"].values())
    from spine_fl.shared.config import RunSettings

    bound = quantization_error_bound(RunSettings(**{**{k: v for k, v in run.items()}, "task": "rbp_tabular"}), smallest)
    for key in a:
        assert not torch.equal(a[key], start[key]) or key.endswith("bias")  # training moved the weights
        assert (a[key] - b[key]).abs().max().item() <= 3 * bound, key


def test_only_parameters_and_numeric_metrics_leave_a_site(tmp_path: Path) -> None:
    """Every reply a ClientApp sends is intercepted (outermost mod) and inspected."""
    capture = tmp_path / "captured"
    capture.mkdir()

    def capture_mod(msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        record = {"error": reply.error.reason if reply.has_error() else None, "arrays": {}, "values": {}}
        if reply.has_content():
            for name, rec in reply.content.array_records.items():
                record["arrays"][name] = [a.numpy() for a in rec.values()]
            for kind in ("config_records", "metric_records"):
                for name, rec in getattr(reply.content, kind).items():
                    record["values"].update({f"{name}/{k}": v for k, v in rec.items()})
        (capture / f"{time.time_ns()}-{os.getpid()}.pkl").write_bytes(pickle.dumps(record))
        return reply

    out = tmp_path / "leak"
    out.mkdir()
    scenario = load_scenario(scenario_file(out / "s.toml", run={"task": "tfesi_mri", "image_size": 32, "rounds": 2,
                                                                "batch_size": 32}))
    simulate(scenario, out, outer_mods=[capture_mod])

    model_shapes = sorted(tuple(v.shape) for v in build_model(get_task("tfesi_mri"), 1).state_dict().values())
    secrets: set[str] = set()
    for site in (out / "sites").iterdir():
        table = pd.read_csv(site / "clinical.csv")
        secrets |= set(table.patient_id)
        manifest = pd.read_csv(site / "manifest.csv")
        for rel in manifest.path[:20]:
            ds = pydicom.dcmread(site / rel)
            secrets |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.StudyDate, ds.AccessionNumber}
    replies = [pickle.loads(p.read_bytes()) for p in capture.iterdir()]
    assert len(replies) >= 3 * 2 * 5  # 3 sites x 2 rounds x (4 SecAgg+ stages, the first with the pre-flight, + evaluate)
    site_names = {p.name for p in (out / "sites").iterdir()}
    for reply in replies:
        assert reply["error"] is None
        for record, arrays in reply["arrays"].items():
            assert record == "fitres.parameters"
            assert sorted(tuple(a.shape) for a in arrays) in (model_shapes, [])  # SecAgg+ sends them masked
        for key, value in reply["values"].items():
            if isinstance(value, bool | int | float):
                assert np.isfinite(value), key
            elif isinstance(value, str) and key.rsplit("/", 1)[1] in protocol.LEDGER_TEXT:  # hex digests only
                assert re.fullmatch(r"(sha256:)?[0-9a-f]{32,64}", value), (key, value)
            elif isinstance(value, str) and key == f"{protocol.PREFLIGHT_REPLY}/{protocol.SITE}":
                assert value in site_names, value  # the replying site's own name
            elif isinstance(value, str):
                assert key.endswith("res.status/message") and value in ("", "Success"), (key, value)
            else:  # SecAgg+ keys, key shares and masked vectors: bytes, never readable text
                assert key.startswith("secaggplus_configs/"), key
                blobs = value if isinstance(value, list) else [value]
                for blob in blobs:
                    if isinstance(blob, bytes):
                        assert not any(s.encode() in blob for s in secrets if len(s) >= 6), key
                    else:
                        assert isinstance(blob, int | float), key
    assert verify(out / "site-state" / "leiden").ok


def test_killed_mid_run_loses_no_spent_budget(tmp_path: Path) -> None:
    state = tmp_path / "state"
    scenario = scenario_file(tmp_path / "long.toml", run={"rounds": 30}, state_dir=state)
    proc = subprocess.Popen([sys.executable, "-m", "spine_fl.cli", "simulate", "--scenario", str(scenario),
                             "--out", str(tmp_path / "killed")], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            files = list(state.glob("*/privacy/*.jsonl"))
            if len(files) == 3 and all(len(f.read_text().splitlines()) >= 2 for f in files):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the run never recorded two rounds")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: CLI, Ray and its workers
        proc.wait(timeout=60)
    recorded = {f.parent.parent.name: PrivacyLedger(f.parent.parent, f.stem).history() for f in state.glob("*/privacy/*.jsonl")}
    assert all(len(h) >= 2 for h in recorded.values())  # every line intact and readable after SIGKILL

    again = run_scenario(tmp_path, "restart", run={"rounds": 1}, state_dir=state)
    for site, p in again["privacy"]["per_site"].items():
        before = recorded[site]
        expected = epsilon([*before, (p["noise_multiplier"], p["sample_rate"], p["steps"])], p["delta"])
        assert p["epsilon_lifetime"] == pytest.approx(expected, rel=1e-6)
