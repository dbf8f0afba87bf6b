"""Federated recalibration against issue 13's targets, on fresh runs of a scenario.

    python -m spine_fl.simulations.benchmarks.calibration [--runs 3] [--scenario default]
        [--out benchmarks/calibration.json] [--keep DIR]

Each run is a fresh `spine-fl simulate` (new synthetic noise, new DP noise, new secure-aggregation
masks) in its own process; the figures are read from its metrics.json: the held-out test and
external patients' calibration slope, Brier (against the base-rate Brier), and sensitivity and
specificity at the recommended threshold, before recalibration (probabilities as trained, cut at
0.5) and after (Platt's map folded in, cut at the recommended threshold). Targets (issue 13): slope
0.8-1.25, Brier below the base rate, sensitivity and specificity both >= 0.6. The calibration
patients include the held-out test patients (with DP also the training patients), so the "test"
figures are partly in-sample; "external" are patients no release touched.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spine_fl.simulations.benchmarks import record

TARGETS = {"calibration_slope": [0.8, 1.25], "brier_below_base_rate": True, "sensitivity_min": 0.6,
           "specificity_min": 0.6}


def meets(figures: dict[str, Any]) -> dict[str, bool]:
    low, high = TARGETS["calibration_slope"]
    return {"slope": low <= figures["slope"] <= high, "brier": figures["brier"] < figures["base_rate_brier"],
            "sensitivity": (figures["sensitivity"] or 0) >= TARGETS["sensitivity_min"],
            "specificity": (figures["specificity"] or 0) >= TARGETS["specificity_min"]}


def run_figures(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    section = metrics.get("calibration") or {}
    out: dict[str, Any] = {"auroc": metrics["federated"]["auroc"], "status": section.get("status"),
                           "reason": section.get("reason"), "window": section.get("window"),
                           "map": {"a": section.get("a"), "b": section.get("b")},
                           "threshold": section.get("threshold"),
                           "epsilon_total": {s: p.get("epsilon_total") for s, p in metrics["privacy"]["per_site"].items()},
                           "epsilon_training": {s: p.get("epsilon") for s, p in metrics["privacy"]["per_site"].items()},
                           "held_out": {}}
    for split, figures in (section.get("held_out") or {}).items():
        out["held_out"][split] = {when: {**figures[when], "meets": meets(figures[when])} for when in ("before", "after")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/calibration.json"))
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    machine, commit, started = record.machine(), record.commit(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        for i in range(1, args.runs + 1):
            run_dir = root / f"run{i}"
            command = [sys.executable, "-m", "spine_fl.cli", "simulate", "--scenario", args.scenario, "--out", str(run_dir)]
            print(f"run {i}/{args.runs}: spine-fl simulate --scenario {args.scenario}", flush=True)
            t0 = time.time()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            runs.append({"run": i, "seconds": round(time.time() - t0, 1), **run_figures(run_dir)})
            after = runs[-1]["held_out"].get("test", {}).get("after")
            print(f"  test after recalibration: {after and {k: after[k] for k in ('slope', 'brier', 'sensitivity', 'specificity')}}",
                  flush=True)
    machine["load_average_end"] = record.load_average()
    document = {"machine": machine, "commit": commit, "date": started,
                "command": f"python -m spine_fl.simulations.benchmarks.calibration --runs {args.runs} --scenario {args.scenario}",
                "targets": TARGETS, "runs": runs,
                "all_runs_meet_targets": {split: all(all(r["held_out"].get(split, {}).get("after", {}).get("meets", {"x": False}).values())
                                                     for r in runs) for split in ("test", "external")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
