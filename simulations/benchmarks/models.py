"""What each registry model costs: one DP-SGD round (Opacus) on a few synthetic patients.

    python -m spine_fl.simulations.benchmarks.models [--out benchmarks/models.json] [--models NAME ...]

One synthetic MRI site (simulations/synthetic, T2 axial DICOM plus the clinical table) is written
once; each model then trains one round of DP-SGD through shared/training/local.py `train` on the
first patients of that site, at the model's native input size (64 px for the small CNN, 224 px for
the MONAI networks), in its own process so that its peak memory is its own. Recorded per model:
parameters, seconds for the DP round (make_private included), steps, peak resident memory, CPU or
CUDA, with the machine, the command and the git commit. Timings are wall clock on a shared
machine (the load average is recorded): compare orders of magnitude, not seconds across machines.
AUROC is not measured here: one round on a handful of patients says nothing about accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

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
README_SECTION = "## models"


def _git(*args: str) -> str:
    """Read-only git queries (GIT_OPTIONAL_LOCKS=0: `status` does not rewrite the index)."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _machine() -> dict[str, object]:
    import opacus
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import monai
        monai_version = monai.__version__
    except ImportError:
        monai_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
            "monai": monai_version, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


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
    from spine_fl.shared.training.local import DpSettings, TrainSettings, train

    task_name, patients = PLAN[name], PATIENTS
    task = get_task(task_name)
    size = image_size(name) if task.image else None
    data = load_site(site_dir, task, image_size=size or 64)
    keep = slice(0, patients)
    data = SiteData(data.patient_ids[keep], data.split[keep], data.y[keep], data.features[keep],
                    None if data.images is None else data.images[keep], data.subgroups[:patients])
    device = pick_device()
    started = time.perf_counter()
    model = build_model_named(name, task, seed=0)
    build_seconds = time.perf_counter() - started
    settings = TrainSettings(epochs=1, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, optimizer="sgd")
    started = time.perf_counter()
    _, spend = train(model, data, settings, device, DpSettings(NOISE_MULTIPLIER, MAX_GRAD_NORM))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "model": name, "task": task_name, "image_px": size, "patients": len(data), "batch_size": BATCH_SIZE,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(build_seconds, 2), "dp_round_seconds": round(seconds, 2),
        "dp_steps": spend.steps if spend else 0,
        "peak_rss_mib": round(peak_kib / 1024), "device": device.type,
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
        "data": f"synthetic MRI site ({task_name}), first {len(data)} patients",
    }


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
                    f"| {r['dp_round_seconds']} | {r['peak_rss_mib']:,} | {r['device']}: {where} |")
    return rows


def write_readme(path: Path, report: dict) -> None:
    """Refresh this suite's section of benchmarks/README.md; other sections stay as they are."""
    head = ("# Benchmarks\n\nResults files written by `spine_fl.simulations.benchmarks.*`; each section is "
            "refreshed by its own command.\n")
    text = path.read_text() if path.exists() else head
    m = report["machine"]
    section = "\n".join([
        README_SECTION, "",
        f"One DP-SGD round (Opacus, noise {NOISE_MULTIPLIER}, clipping {MAX_GRAD_NORM}, SGD lr {LEARNING_RATE}, "
        f"batch {BATCH_SIZE}, Poisson sampling) per registry model, on the first patients of one synthetic MRI "
        "site. Written by:", "",
        f"    {report['command']}", "",
        f"Commit {report['git_commit'][:12]}{' (with uncommitted changes)' if report['git_dirty'] else ''}, "
        f"{report['date']}; torch {m['torch']}, opacus {m['opacus']}, monai {m['monai']}; load average at start "
        f"{m['load_average_at_start'][0]} (the machine was shared). Full figures: `models.json`.", "",
        "| model | task | input | parameters | patients / steps | DP round (s) | peak RSS (MiB) | device |",
        "|---|---|---|---:|---:|---:|---:|---|",
        *_readme_rows(report), "",
    ])
    start = text.find(README_SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(README_SECTION))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/models.json"))
    parser.add_argument("--models", nargs="+", choices=list(PLAN), default=list(PLAN))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one model in this process
    parser.add_argument("--site", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.site)))
        return
    command = " ".join(["python -m spine_fl.simulations.benchmarks.models", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "git_commit": _git("rev-parse", "HEAD"),
              "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": _machine(), "results": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        site = synthesize_site(Path(tmp))
        for name in args.models:
            proc = subprocess.run([sys.executable, "-m", "spine_fl.simulations.benchmarks.models", "--one", name,
                                   "--site", str(site)], capture_output=True, text=True)
            if proc.returncode == 0:
                result = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                result = {"model": name, "error": proc.stderr.strip()[-2000:] or f"exit {proc.returncode}"}
            report["results"].append(result)
            print(json.dumps(result), flush=True)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    write_readme(args.out.parent / "README.md", report)


if __name__ == "__main__":
    main()
