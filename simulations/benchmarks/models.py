"""What each registry model costs: one DP-SGD round (Opacus) on a few synthetic patients.

    spine-fl benchmark models [--models NAME,...] [--out benchmarks/models.json]

One synthetic MRI site (simulations/synthetic, T2 axial DICOM plus the clinical table) is written
once; each model then trains one round of DP-SGD through shared/training/local.py `train` on the
first patients of that site, at the model's native input size (64 px for the small CNN, 224 px for
the MONAI networks), in its own process so that its peak memory is its own. Recorded per model:
parameters, seconds for the DP round (make_private included), steps, peak resident memory, CPU or
CUDA, with the machine, the command and the git commit. Timings are wall clock on a shared
machine (the load average is recorded): compare orders of magnitude, not seconds across machines.

The image networks also get a short federation on the synthetic MRI consortium (`consortium_run`):
three hospitals, DP-SGD and SecAgg+ as in the default scenario, the tfesi_mri task with its model
replaced by the network (a task file written for the run, as a consortium would), seconds per
round and the held-out AUROC after each round. At 224 px that is minutes per round on a CPU: on a
CPU-only machine `--image-size` picks a smaller input (the size used is recorded with the figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from spine_fl.simulations.benchmarks.measure import peak_rss_mib

# model -> the task whose inputs it reads. 16 patients with batch 8: two DP-SGD steps (Poisson
# sampling, rate 0.5) per model; DenseNet121 at 224 px, the slowest, takes well under a minute here.
PLAN: dict[str, str] = {
    "small_cnn": "tfesi_mri",
    "logistic": "rbp_tabular",
    "mlp": "rbp_tabular",
    "densenet121": "tfesi_mri",
    "resnet18": "tfesi_mri",
    "resnet34": "tfesi_mri",
    "fusion": "tfesi_fusion",  # encoder resnet18 (its default)
}
PATIENTS = 16
BATCH_SIZE = 8
# DP and optimizer as RunSettings' defaults (noise 1.0, clipping 1.0, SGD at 0.3); one local epoch.
NOISE_MULTIPLIER, MAX_GRAD_NORM, LEARNING_RATE = 1.0, 1.0, 0.3
SITE_PATIENTS = 24  # patients in the synthetic site (at least PATIENTS)
CONSORTIUM_MODELS = ("small_cnn", "resnet18", "resnet34", "densenet121")  # the image networks on tfesi_mri
README_SECTION = "## models"


def synthesize_site(out: Path) -> Path:
    """One small synthetic MRI site (T2 axial DICOM + clinical table)."""
    from spine_fl.simulations.synthetic.consortium import PROFILES
    from spine_fl.simulations.synthetic.consortium import synthesize_site as write_site

    profile = replace(PROFILES[0], n_patients=SITE_PATIENTS)
    write_site(out / profile.name, profile, seed=7, modalities=("mri",))
    return out / profile.name


def run_one(name: str, site_dir: Path) -> dict[str, object]:
    """Build `name`, train one DP-SGD round, measure (runs in its own process)."""
    import opacus  # noqa: F401  (imported here so that its import time is not counted as training)
    import torch

    from spine_fl.shared.contract.data_contract import SiteData, load_site
    from spine_fl.shared.contract.tasks import get_task
    from spine_fl.shared.models.registry import build_model_named, image_size, pick_device
    from spine_fl.shared.training.local import DpSettings, TrainSettings, mixed_precision, train

    task_name, patients = PLAN[name], PATIENTS
    task = get_task(task_name)
    size = image_size(name) if task.image else None
    data = load_site(site_dir, task, image_size=size or 64)
    keep = slice(0, patients)
    data = SiteData(data.patient_ids[keep], data.split[keep], data.y[keep], data.features[keep],
                    None if data.images is None else data.images[keep], data.subgroups[:patients])
    device = pick_device()
    if device.type == "cuda":  # CUDA's start-up (seconds, once per process) is not the round's cost
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    started = time.perf_counter()
    model = build_model_named(name, task, seed=0)
    build_seconds = time.perf_counter() - started
    settings = TrainSettings(epochs=1, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, optimizer="sgd")
    started = time.perf_counter()
    _, spend = train(model, data, settings, device, DpSettings(NOISE_MULTIPLIER, MAX_GRAD_NORM))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "model": name, "task": task_name, "image_px": size, "patients": len(data), "batch_size": BATCH_SIZE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(build_seconds, 2), "dp_round_seconds": round(seconds, 2),
        "dp_steps": spend.steps if spend else 0,
        "peak_rss_mib": peak_rss_mib(), "device": device.type, "bf16_autocast": mixed_precision(device, data),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
        "data": f"synthetic MRI site ({task_name}), first {len(data)} patients",
    }


def _scenario_toml(task_file: str, rounds: int, image_size: int) -> str:
    from spine_fl.simulations.benchmarks.spine_run import BENCHMARK_POLICY

    policy = "\n".join(f"{k} = {v}" for k, v in BENCHMARK_POLICY.items())
    return f"""name = "models-benchmark"

[consortium]
source = "synthetic"
sites = 3
seed = 7

[run]
task = "{task_file}"
image_size = {image_size}
rounds = {rounds}
min_sites = 3
dp = true
secagg = true

[policy]
{policy}
"""


def consortium_run(name: str, rounds: int, image_size: int | None, work: Path,
                   say: Callable[[str], None] = print) -> dict[str, object]:
    """`rounds` federated rounds of tfesi_mri with its model set to `name` (DP + SecAgg+, 3 synthetic
    MRI hospitals): seconds and held-out AUROC per round."""
    from spine_fl.shared.contract.tasks import shipped_task_files
    from spine_fl.shared.models.registry import image_size as native_size
    from spine_fl.simulations.runner import build_consortium, load, run_federation, virtual_sites

    size = image_size or native_size(name)
    work.mkdir(parents=True, exist_ok=True)
    task_text = shipped_task_files()["tfesi_mri"].read_text()
    head, model = task_text.split("[model]", 1)
    model = "\n".join(f'name = "{name}"' if line.strip().startswith("name") else line for line in model.splitlines())
    task_name = f"tfesi_mri_{name}"
    (work / f"{task_name}.toml").write_text(head.replace('name = "tfesi_mri"', f'name = "{task_name}"') + "[model]" + model)
    (work / "scenario.toml").write_text(_scenario_toml(f"{task_name}.toml", rounds, size))
    scenario = load(work / "scenario.toml")
    rounds_seen: list[dict] = []

    def on_round(entry: dict) -> None:
        rounds_seen.append(entry)
        say(f"{name} at {size} px: round {entry['round']} took {entry['seconds']} s, AUROC {entry['auroc']:.3f}")

    site_dirs = build_consortium(scenario, work / "data")
    run_federation(scenario, virtual_sites(scenario, site_dirs, work / "out"), work / "out", on_round=on_round)
    seconds = [e["seconds"] for e in rounds_seen]
    return {"model": name, "task": "tfesi_mri (model replaced)", "image_px": size, "sites": len(site_dirs),
            "dp": True, "secagg": True, "rounds": len(rounds_seen), "round_seconds": seconds,
            "median_round_seconds_after_first": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
            "auroc_by_round": [round(float(e["auroc"]), 3) for e in rounds_seen],
            "auroc_final": round(float(rounds_seen[-1]["auroc"]), 3) if rounds_seen else None,
            "device": "cuda" if _cuda() else "cpu"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _readme_rows(report: dict) -> list[str]:
    m = report["machine"]
    where = m["cuda"] or f"{m['cpu']}, {m['cores']} cores"
    rows = []
    for r in report["results"]:
        if "error" in r:
            rows.append(f"| {r['model']} | | | | | | | failed: {r['error'].splitlines()[-1][:80]} |")
            continue
        px = f"{r['image_px']} px" if r["image_px"] else "table"
        rows.append(f"| {r['model']} | {r['task']} | {px} | {r['parameters']:,} | {r['patients']} / {r['dp_steps']} "
                    f"| {r['dp_round_seconds']} | {r['peak_rss_mib']:,}{_cuda_peak(r)} | {r['device']}: {where}"
                    f"{', bf16 autocast' if r.get('bf16_autocast') else ''} |")
    return rows


def _cuda_peak(row: dict) -> str:
    return f" (CUDA {row['peak_cuda_mib']:,})" if row.get("peak_cuda_mib") is not None else ""


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _consortium_rows(report: dict, results_file: str) -> list[str]:
    rows = report.get("consortium") or []
    if not rows:
        return []
    return [
        "Federation of each image network on the synthetic MRI consortium (3 hospitals, DP-SGD and SecAgg+, "
        f"tfesi_mri with its model replaced; `consortium` in `{results_file}`):", "",
        "| model | input | rounds | s/round (median after round 1) | held-out AUROC by round | device |",
        "|---|---|---:|---:|---|---|",
        *(f"| {r['model']} | {r['image_px']} px | {r['rounds']} | {_seconds(r['median_round_seconds_after_first'])} | "
          f"{' / '.join(str(a) for a in r['auroc_by_round'])} | {r['device']} |" for r in rows), ""]


def write_readme(path: Path, report: dict, heading: str = README_SECTION, results_file: str = "models.json") -> None:
    """Refresh this suite's section `heading` of benchmarks/README.md; other sections stay as they are."""
    head = ("# Benchmarks\n\nResults files written by `spine_fl.simulations.benchmarks.*`; each section is "
            "refreshed by its own command.\n")
    text = path.read_text() if path.exists() else head
    m = report["machine"]
    section = "\n".join([
        heading, "",
        f"One DP-SGD round (Opacus, noise {NOISE_MULTIPLIER}, clipping {MAX_GRAD_NORM}, SGD lr {LEARNING_RATE}, "
        f"batch {BATCH_SIZE}, Poisson sampling) per registry model, on the first patients of one synthetic MRI "
        "site. Written by:", "",
        f"    {report['command']}", "",
        f"Commit {report['git_commit'][:12]}{' (with uncommitted changes)' if report['git_dirty'] else ''}, "
        f"{report['date']}; torch {m['torch']}, opacus {m['opacus']}, monai {m['monai']}; load average at start "
        f"{m['load_average_at_start'][0]}{' (the machine was shared)' if m.get('shared', True) else ''}. Full figures: "
        f"`{results_file}`.", "",
        "| model | task | input | parameters | patients / steps | DP round (s) | peak RSS (CUDA) (MiB) | device |",
        "|---|---|---|---:|---:|---:|---:|---|",
        *_readme_rows(report), "",
        *_consortium_rows(report, results_file),
    ])
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")


def run(models: list[str], say: Callable[[str], None] = print) -> list[dict[str, object]]:
    """One row per model, each trained in its own process on one synthetic MRI site."""
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        say("writing one synthetic MRI site ...")
        site = synthesize_site(Path(tmp))
        for name in models:
            say(f"{name}: one DP-SGD round ...")
            proc = subprocess.run([sys.executable, "-m", "spine_fl.simulations.benchmarks.models", "--one", name,
                                   "--site", str(site)], capture_output=True, text=True)
            if proc.returncode == 0:
                result = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                result = {"model": name, "error": proc.stderr.strip()[-2000:] or f"exit {proc.returncode}"}
            rows.append(result)
            say(f"{name}: " + (f"failed: {str(result['error']).splitlines()[-1][:160]}" if "error" in result else
                               f"{result['dp_round_seconds']} s, peak {result['peak_rss_mib']} MiB"))
    return rows


def legacy_fields(envelope: dict) -> dict:
    """The keys this file had before `spine-fl benchmark` (write_readme and readers use them)."""
    m = envelope["machine"]
    machine = {**m, **m["versions"], "cuda": m["gpu"], "load_average_at_start": m["load_average_start"]}
    return {"git_commit": envelope["commit"]["sha"] or "", "git_dirty": envelope["commit"]["dirty"], "machine": machine}


def headline(report: dict) -> str:
    rows = [r for r in report["results"] if "error" not in r]
    failed = [r["model"] for r in report["results"] if "error" in r]
    text = ", ".join(f"{r['model']} {r['dp_round_seconds']} s" for r in rows) or "no model ran"
    federated = "; ".join(f"{r['model']} {r['image_px']} px AUROC {r['auroc_final']} after {r['rounds']} rounds"
                          for r in report.get("consortium") or [])
    return (f"one DP round: {text}" + (f"; failed: {', '.join(failed)}" if failed else "")
            + (f"; federated: {federated}" if federated else ""))


def main(argv: list[str] | None = None) -> None:
    """`python -m spine_fl.simulations.benchmarks.models --one NAME --site DIR`: run_one in a process of
    its own (run() starts it, so that each model's peak memory is its own)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", required=True, choices=list(PLAN))
    parser.add_argument("--site", type=Path, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(run_one(args.one, args.site)))


if __name__ == "__main__":
    main()
