"""Which Opacus per-sample-gradient mode to train each model with, chosen by measurement.

Opacus can compute the per-sample gradients DP-SGD clips with module hooks ("hooks", the default
spine-fl uses), with torch.func's vmap for every layer ("functorch"), with PyTorch's expanded
weights ("ew"), or skip materialising them: ghost clipping ("ghost") computes only the per-sample
gradient *norms* and takes a second backward pass with the clipped loss. Which is fastest depends
on the layers and the input size, so it is measured per model: all modes in one process with their
steps interleaved (a busy machine slows each alike; the speed-up over hooks compares fastest
steps, the paired median of per-step ratios is recorded beside it), and each mode once more in its
own process for its peak memory and for one step
without noise, whose gradient is compared with hooks' (a mode that computes a different gradient
is no candidate), and one step on an empty batch: Poisson sampling draws them and spine-fl's
training takes them as noise-only steps, so a mode that fails on one cannot replace hooks as is.

The batch is random tensors of the task's input shape (values do not change the cost).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from spine_fl.simulations.benchmarks.measure import peak_rss_mib

MODES = ("hooks", "functorch", "ew", "ghost")
# model -> (task, timed steps): the fast default at 64 px and the fastest 224-px MONAI network
PLAN: dict[str, tuple[str, int]] = {"small_cnn": ("tfesi_radiograph", 12), "resnet18": ("tfesi_radiograph", 8)}
BATCH_SIZE = 8
NOISE_MULTIPLIER, MAX_GRAD_NORM, LEARNING_RATE = 1.0, 1.0, 0.3
AGREEMENT = 1e-3  # largest |g_mode - g_hooks| / max|g_hooks| for a mode to count as the same gradient
MARGIN = 1.1  # another mode replaces hooks only when at least 10% faster (paired median)


def _batch(task_name: str, px: int) -> tuple[Any, Any, Any]:
    import torch

    from spine_fl.shared.contract.tasks import get_task

    task = get_task(task_name)
    g = torch.Generator().manual_seed(0)
    views = len(task.image.views) if task.image else 0
    images = torch.rand((BATCH_SIZE, views, px, px), generator=g) if views else torch.zeros(BATCH_SIZE, 0)
    features = torch.randn((BATCH_SIZE, task.n_features), generator=g)
    y = (torch.rand(BATCH_SIZE, generator=g) > 0.5).float()
    return images, features, y


def _private(model_name: str, mode: str, noise: float, amp: bool = False) -> tuple[Any, Callable[[int | None], None]]:
    """The registry's model (seed 0) made private in `mode`, on the device spine-fl trains on; (the
    bare model, one DP-SGD step on the first n patients of the batch, all of them by default).
    `amp`: the step as spine-fl's training takes it on a GPU (bf16 autocast, fp32 clipping)."""
    import warnings

    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from spine_fl.shared.contract.tasks import get_task
    from spine_fl.shared.models.registry import build_model_named, image_size, pick_device
    from spine_fl.shared.training.local import grad_samples_to_fp32

    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    task_name = PLAN[model_name][0]
    device = pick_device()  # where spine-fl trains: a CUDA GPU when there is one
    images, features, y = (t.to(device) for t in _batch(task_name, image_size(model_name)))
    model = build_model_named(model_name, get_task(task_name), seed=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loader = DataLoader(TensorDataset(images, features, y), batch_size=BATCH_SIZE)
    criterion = nn.BCEWithLogitsLoss()
    made = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                        noise_multiplier=noise, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False,
                                        grad_sample_mode=mode)
    if mode == "ghost":  # ghost clipping wraps the loss too: its backward runs the second pass
        private, dp_optimizer, dp_criterion, _ = made
    else:
        (private, dp_optimizer, _), dp_criterion = made, criterion

    def step(n: int | None = None) -> None:
        dp_optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = private(images[:n], features[:n])
            # as shared/training/local.py: Poisson sampling may draw nobody, still a (noise-only) DP step
            loss = dp_criterion(logits, y[:n]) if len(y[:n]) else logits.sum()
        loss.backward()
        if amp:
            grad_samples_to_fp32(list(model.parameters()))
        dp_optimizer.step()
        if device.type == "cuda":  # the step's kernels finish before its time is read
            torch.cuda.synchronize()

    return model, step


def check(model_name: str, mode: str, grad_file: Path) -> dict[str, Any]:
    """In a fresh process: one step without noise (the clipped mean gradient to `grad_file`), the
    peak memory, and whether the mode survives an empty batch (Poisson sampling draws them). In fp32
    always: whether a mode computes hooks' gradient does not depend on the precision, and bf16's
    rounding would hide a real difference under the agreement threshold."""
    import torch

    before = peak_rss_mib()
    model, step = _private(model_name, mode, noise=0.0)
    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    np.save(grad_file, torch.cat([p.grad.detach().flatten() for p in model.parameters()
                                   if p.grad is not None]).cpu().numpy())
    peak = peak_rss_mib()
    try:
        step(0)
        empty = None
    except Exception as exc:  # noqa: BLE001 - recorded: such a mode cannot train under Poisson sampling as is
        empty = f"{type(exc).__name__}: {exc}"
    return {"model": model_name, "mode": mode, "first_step_seconds": round(first, 3),
            "peak_rss_mib": peak, "step_peak_rss_growth_mib": peak - before,
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
            "empty_batch_ok": empty is None, "empty_batch_error": empty}


def time_modes(model_name: str, modes: list[str], steps: int) -> dict[str, Any]:
    """All `modes` in one process, steps interleaved (hooks, ew, ..., hooks, ew, ...): a busy machine
    slows every mode alike. One untimed warm-up step each. On a GPU with bf16 the steps run under
    autocast, as spine-fl trains image networks there."""
    from spine_fl.shared.models.registry import image_size
    from spine_fl.shared.training.local import native_bf16

    amp = native_bf16()
    made: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    for mode in modes:
        try:
            _, step = _private(model_name, mode, noise=NOISE_MULTIPLIER, amp=amp)
            step()
            made[mode] = step
        except Exception as exc:  # noqa: BLE001 - a mode the model does not support is a finding
            errors[mode] = f"{type(exc).__name__}: {exc}"
    seconds: dict[str, list[float]] = {m: [] for m in made}
    for _ in range(steps):
        for mode, step in made.items():
            started = time.perf_counter()
            step()
            seconds[mode].append(time.perf_counter() - started)
    return {"model": model_name, "task": PLAN[model_name][0], "image_px": image_size(model_name),
            "steps": steps, "bf16_autocast": amp, "seconds": seconds, "errors": errors}


def _agreement(grad_dir: Path, model: str, mode: str) -> float | None:
    ref, other = grad_dir / f"{model}-hooks.npy", grad_dir / f"{model}-{mode}.npy"
    if not (ref.exists() and other.exists()):
        return None
    a, b = np.load(ref), np.load(other)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-12))


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model, among the modes that ran, computed hooks' gradient and survived an empty batch
    (spine-fl's Poisson sampling draws them: a noise-only step; when hooks fails too, the network
    itself cannot take one, and that is recorded instead): the largest speed-up over
    hooks, each mode's speed-up taken as the smaller of its two estimates (fastest step against
    hooks' fastest; median of the paired per-step ratios), so that one lucky step on a shared
    machine does not pick it. Hooks stays unless another mode is at least MARGIN faster."""
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        hooks = next((r for r in rows if r["model"] == model and r["mode"] == "hooks" and "error" not in r), None)
        model_fails_empty = hooks is not None and not hooks.get("empty_batch_ok", True)  # the network, not the mode
        ok = [r for r in rows if r["model"] == model and "error" not in r
              and (r.get("empty_batch_ok", True) or model_fails_empty)
              and r.get("relative_difference_to_hooks") is not None and r["relative_difference_to_hooks"] <= AGREEMENT]
        if not ok:
            out[model] = {"mode": None, "why": "no mode ran, survived an empty batch and agreed with hooks"}
            continue
        speed = {r["mode"]: min(r.get("speedup_over_hooks", 1.0), r.get("speedup_over_hooks_paired_median", 1.0))
                 for r in ok}
        best = max(speed, key=lambda m: speed[m])
        if best != "hooks" and speed[best] < MARGIN and "hooks" in speed:
            best = "hooks"
        row = next(r for r in ok if r["mode"] == best)
        out[model] = {"mode": best, "step_seconds_min": row["step_seconds_min"], "speedup_over_hooks": speed[best],
                      "peak_rss_mib": row["peak_rss_mib"], "speedup_over_hooks_by_mode": speed,
                      "lowest_memory_mode": min(ok, key=lambda r: r["peak_rss_mib"])["mode"],
                      "excluded_empty_batch": [r["mode"] for r in rows if r["model"] == model
                                               and not r.get("empty_batch_ok", True) and not model_fails_empty]}
        if model_fails_empty:
            out[model]["model_fails_on_empty_batch"] = hooks.get("empty_batch_error")
    return out


def run(models: list[str], modes: list[str], steps: int | None, say: Callable[[str], None],
        grad_dir: Path) -> dict[str, Any]:
    modes = ["hooks", *[m for m in modes if m != "hooks"]]  # hooks: the reference gradient
    rows = []
    for model in models:
        n = steps or PLAN[model][1]
        say(f"{model}: {n} interleaved step(s) of batch {BATCH_SIZE} in each of {', '.join(modes)} ...")
        timed = _child(["time", model, str(n), *modes])
        for mode in modes:
            say(f"{model}: gradient and memory of {mode} (own process) ...")
            row: dict[str, Any] = {"model": model, "mode": mode}
            checked = _child(["check", model, mode, str(grad_dir / f"{model}-{mode}.npy")])
            error = timed.get("error") or timed["errors"].get(mode) or checked.get("error")
            if error:
                row["error"] = error
            else:
                values = timed["seconds"][mode]
                row |= {k: checked[k] for k in ("first_step_seconds", "peak_rss_mib", "step_peak_rss_growth_mib",
                                                "peak_cuda_mib", "empty_batch_ok", "empty_batch_error")}
                row["bf16_autocast"] = timed["bf16_autocast"]
                row |= {"step_seconds_min": round(min(values), 3),
                        "step_seconds_median": round(statistics.median(values), 3),
                        "step_seconds": [round(v, 3) for v in values],
                        "relative_difference_to_hooks": _agreement(grad_dir, model, mode)}
                hooks = timed["seconds"].get("hooks")
                if hooks:
                    paired = [h / v for h, v in zip(hooks, values)]
                    row["speedup_over_hooks"] = round(min(hooks) / min(values), 2)
                    row["speedup_over_hooks_paired_median"] = round(statistics.median(paired), 2)
            say("  " + (f"{mode} failed: {row['error'].splitlines()[-1][:160]}" if "error" in row else
                        f"{mode}: {row['step_seconds_min']} s/step (min; median {row['step_seconds_median']}), "
                        f"peak {row['peak_rss_mib']} MiB, "
                        f"gradient vs hooks {row['relative_difference_to_hooks']:.1e}"))
            rows.append(row)
    return {"batch_size": BATCH_SIZE, "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM,
            "agreement_threshold": AGREEMENT, "input": "random tensors of the task's shape, seed 0",
            "method": "timings: all modes in one process, steps interleaved, after one warm-up step each; "
                      "gradient (no noise) and peak memory: one process per mode",
            "rows": rows, "recommended": choose(rows)}


def _child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "spine_fl.simulations.benchmarks.dp_modes", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-1500:] or f"exit {proc.returncode}", "errors": {}}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    try:
        if sys.argv[1] == "check":
            print(json.dumps(check(sys.argv[2], sys.argv[3], Path(sys.argv[4]))))
        else:
            print(json.dumps(time_modes(sys.argv[2], sys.argv[4:], int(sys.argv[3]))))
    except Exception:  # noqa: BLE001 - the parent records the failure
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()


def readme_section(modes: dict[str, Any]) -> list[str]:
    """The modes table and the choice per model, from `run`'s result."""
    body = [f"Opacus per-sample-gradient modes, batch {modes['batch_size']}, one DP-SGD step (noise "
            f"{modes['noise_multiplier']}, clipping {modes['max_grad_norm']}); {modes['method']}.", "",
            "| model | mode | s/step (min / median) | speed-up over hooks (paired) | peak RSS (MiB) "
            "| gradient vs hooks "
            "| empty batch | status |", "|---|---|---|---:|---:|---:|---|---|"]
    for r in modes["rows"]:
        if "error" in r:
            body.append(f"| {r['model']} | {r['mode']} | | | | | | failed: "
                        f"{r['error'].splitlines()[-1][:100].replace('|', '/')} |")
            continue
        body.append(f"| {r['model']} | {r['mode']} | {r['step_seconds_min']} / {r['step_seconds_median']} | "
                    f"{r.get('speedup_over_hooks', 1.0)} ({r.get('speedup_over_hooks_paired_median', 1.0)}) | "
                    f"{r['peak_rss_mib']:,} | {r['relative_difference_to_hooks']:.1e} | "
                    f"{'ok' if r.get('empty_batch_ok', True) else 'fails: ' + str(r['empty_batch_error'])[:60]} | ok |")
    body.append("")
    for model, choice in modes["recommended"].items():
        if not choice.get("mode"):
            body.append(f"- {model}: no mode ({choice.get('why')})")
            continue
        body.append(f"- {model}: use `{choice['mode']}` (speed-up over hooks, the smaller of the two estimates: "
                    f"{choice['speedup_over_hooks_by_mode']}; least memory: {choice['lowest_memory_mode']}"
                    + (f"; left out, they fail on an empty batch: {', '.join(choice['excluded_empty_batch'])}"
                       if choice.get("excluded_empty_batch") else "") + ")")
        if choice.get("model_fails_on_empty_batch"):
            error = str(choice["model_fails_on_empty_batch"])[:90]
            body.append(f"  - {model} itself fails on an empty batch, in every mode ({error}): a DP round where "
                        "Poisson sampling draws nobody would raise")
    return body
