"""Audit: does the final shared model reveal which of the site's patients it was trained on?

Members are the site's training patients, non-members its held-out patients (test and external
splits: never trained on). Two attacks on the model the site received:
- loss threshold (Yeom et al. 2018): a lower loss on a patient means "member". The score used is
  the logit-scaled confidence in the true label, phi = (2y - 1) * logit, which ranks patients
  exactly as the loss does;
- LiRA (Carlini et al. 2022, online, global variance as advised for few shadow models): K shadow
  models are trained at the site on random halves of all its labelled patients with the run's
  task, architecture and training settings (DP-SGD with the run's noise multiplier and clipping
  when the run used DP); each patient's phi under the target is compared with its phi under the
  shadows that did and did not train on it (a per-patient likelihood ratio).
Shadows train locally for (completed rounds x local epochs) epochs; the target was averaged with
other sites' updates, so shadows overfit at least as much as the target: a conservative choice.
AUC and TPR at 1% and 0.1% FPR get percentile-bootstrap 95% intervals (scipy.stats.bootstrap with
members and non-members as two samples, each resampled on its own: a stratified bootstrap; shadows
fixed). With N non-members the smallest FPR above 0 is 1/N, so
"TPR at 0.1% FPR" with fewer than 1000 non-members is the TPR at FPR 0. Beside them: the ceiling
that (epsilon, delta)-DP allows, TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)).
Whether an attack beats that ceiling is decided as in DP auditing (Jagielski et al. 2020): at
each audited threshold, Clopper-Pearson bounds on TPR and FPR (scipy's exact binomial interval) (Bonferroni over the tests) give
the epsilon the attack proves with 95% confidence; only a proven epsilon above the accounted one
(or a bootstrap AUC interval above the ceiling's AUC) counts as beating the guarantee. An empirical
FPR of 0 out of ~100 non-members proves little: its upper bound is ~3%, not 0.1%.
The check writes the report's "membership_inference" section; it reads the privacy-budget section
(the run's accounted epsilon) before it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Mapping

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve
from torch.utils.data import DataLoader

from spine_fl.client.audit.inputs import AuditInputs, Reason, reason
from spine_fl.client.privacy.plan import plan_round
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.data_contract import SiteData, SiteDataError, load_site
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.models.registry import build_model, pick_device
from spine_fl.shared.training.accounting import dp_tpr_ceiling
from spine_fl.shared.training.local import DpSettings, TrainSettings, set_weights, tensors, train

SECTIONS = ("membership_inference",)
FPRS = (0.01, 0.001)
CI = 0.95
ROC_POINTS = 200
BOOTSTRAP_BATCH_VALUES = 4_000_000  # resampled scores held at once (memory), however many patients
CLEAR_LEAK_AUC = 0.60  # lower bound of an attack's AUC interval from which the verdict is 'fail'
ABOVE_CHANCE_AUC = 0.55  # ... above which it asks for attention


@torch.no_grad()
def true_label_logit(model: torch.nn.Module, data: SiteData, device: torch.device) -> np.ndarray:
    """phi = log(p / (1 - p)) of the true label, from the logit itself (no saturation at p = 1)."""
    model.to(device).eval()
    out = [model(images.to(device), features.to(device)).cpu().numpy()
           for images, features, _ in DataLoader(tensors(data), batch_size=256)]
    logits = np.concatenate(out).astype(np.float64) if out else np.zeros(0)
    return (2.0 * data.y - 1.0) * logits


def _subset(data: SiteData, keep: np.ndarray) -> SiteData:
    return SiteData(data.patient_ids[keep], data.split[keep], data.y[keep], data.features[keep],
                    None if data.images is None else data.images[keep], data.subgroups[keep].reset_index(drop=True))


def shadow_phis(settings: RunSettings, data: SiteData, rounds: int, dp: DpSettings | None, k: int, seed: int,
                device: torch.device,
                progress: Callable[[str], None] = lambda _: None) -> tuple[np.ndarray, np.ndarray]:
    """phi of every patient under K shadow models, and which patients each shadow trained on.
    Shadows come in complementary pairs, so every patient is 'in' for exactly half of them."""
    rng = np.random.default_rng(seed)
    n = len(data)
    inside = np.zeros((k, n), dtype=bool)
    phis = np.zeros((k, n))
    local = TrainSettings(epochs=max(1, rounds) * settings.local_epochs, batch_size=settings.batch_size,
                          learning_rate=settings.learning_rate, optimizer=settings.optimizer)
    for i in range(k):
        if i % 2 == 0:
            inside[i, rng.permutation(n)[: n // 2]] = True
        else:
            inside[i] = ~inside[i - 1]
        progress(f"shadow model {i + 1}/{k}")
        model = build_model(get_task(settings.task), settings.seed)
        train(model, _subset(data, inside[i]), replace(local, seed=seed * 1000 + i), device, dp)
        phis[i] = true_label_logit(model, data, device)
    return phis, inside


def lira_scores(target: np.ndarray, phis: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Per-patient log likelihood ratio of 'in' vs 'out' under Gaussians fitted to the shadows' phi."""
    def means(mask: np.ndarray) -> np.ndarray:
        counts = mask.sum(axis=0)
        overall = phis[mask].mean() if mask.any() else 0.0
        return np.where(counts > 0, (phis * mask).sum(axis=0) / np.maximum(counts, 1), overall)

    mu_in, mu_out = means(inside), means(~inside)
    sd_in = max(float(np.std((phis - mu_in)[inside])), 1e-6) if inside.any() else 1.0
    sd_out = max(float(np.std((phis - mu_out)[~inside])), 1e-6) if (~inside).any() else 1.0
    return stats.norm.logpdf(target, mu_in, sd_in) - stats.norm.logpdf(target, mu_out, sd_out)


def tpr_at_fpr(is_member: np.ndarray, scores: np.ndarray, fpr_limit: float) -> float:
    fpr, tpr, _ = roc_curve(is_member, scores)
    return float(tpr[fpr <= fpr_limit + 1e-12].max())


def dp_auc_ceiling(epsilon: float, delta: float) -> float:
    grid = np.linspace(0.0, 1.0, 20001)
    return float(np.trapezoid(dp_tpr_ceiling(grid, epsilon, delta), grid))


def roc_statistics(member_scores: np.ndarray, nonmember_scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUC, then the TPR at each of FPRS, of an attack scoring members against non-members: one value
    each, or one per resample along any leading axes (the scores lie along `axis`). Equal to
    roc_auc_score and to `tpr_at_fpr` (roc_curve's best TPR at an FPR within the limit); with tied
    scores the TPR may be higher than roc_curve's, which drops collinear points of the curve."""
    members, others = np.moveaxis(member_scores, axis, -1), np.moveaxis(nonmember_scores, axis, -1)
    n_members, n_others = members.shape[-1], others.shape[-1]
    ranks = stats.rankdata(np.concatenate([members, others], axis=-1), axis=-1)  # ties share their mean rank
    auc = (ranks[..., :n_members].sum(axis=-1) - n_members * (n_members + 1) / 2) / (n_members * n_others)
    ordered = np.sort(others, axis=-1)
    tprs = []
    for limit in FPRS:
        allowed = math.floor(n_others * (limit + 1e-12))  # false positives within the limit
        if allowed >= n_others:
            tprs.append(np.ones_like(auc))
            continue
        # the best threshold flags every score above the (allowed + 1)-th highest non-member's
        cut = ordered[..., n_others - 1 - allowed]
        tprs.append((members > cut[..., None]).mean(axis=-1))
    return np.stack([auc, *tprs])


def _resamplable(group: np.ndarray) -> np.ndarray:
    """scipy's bootstrap needs two values per sample; resampling one value or two copies of it is the
    same (and the statistics are shares within each group, so unchanged)."""
    return np.repeat(group, 2) if len(group) == 1 else group


def evaluate_attack(is_member: np.ndarray, scores: np.ndarray, bootstrap: int, seed: int) -> dict[str, Any]:
    """AUC and TPR at the audit's FPRs, each with a percentile-bootstrap interval (members and
    non-members resampled separately), and the ROC curve to plot."""
    is_member = np.asarray(is_member, dtype=bool)
    groups = (_resamplable(scores[is_member]), _resamplable(scores[~is_member]))
    # two samples, paired=False: scipy resamples each on its own (the stratified bootstrap)
    resampled = stats.bootstrap(groups, roc_statistics, paired=False, vectorized=True, axis=-1,
                                confidence_level=CI, method="percentile", n_resamples=bootstrap,
                                batch=max(1, BOOTSTRAP_BATCH_VALUES // len(scores)), random_state=seed)
    low, high = (np.asarray(bound, dtype=float) for bound in resampled.confidence_interval)
    fpr, tpr, _ = roc_curve(is_member, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).astype(int))
    return {
        "auc": float(roc_auc_score(is_member, scores)), "auc_ci": [float(low[0]), float(high[0])],
        "tpr_at_fpr": [{"fpr": limit, "tpr": tpr_at_fpr(is_member, scores, limit),
                        "ci": [float(low[1 + j]), float(high[1 + j])]} for j, limit in enumerate(FPRS)],
        "roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()},
    }


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) interval of a binomial proportion k / n (Clopper-Pearson)."""
    if n == 0:
        return 0.0, 1.0
    interval = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=1 - alpha, method="exact")
    return float(interval.low), float(interval.high)


def proven_epsilon(is_member: np.ndarray, scores: np.ndarray, delta: float) -> float:
    """The epsilon this attack proves with 95% confidence at the audit's FPR thresholds (0 if none)."""
    members, others = int(is_member.sum()), int((~is_member).sum())
    fpr, tpr, _ = roc_curve(is_member, scores)
    alpha = (1 - CI) / (2 * len(FPRS))  # two directions per threshold, Bonferroni
    best = 0.0
    for limit in FPRS:
        i = int(np.flatnonzero(fpr <= limit + 1e-12)[np.argmax(tpr[fpr <= limit + 1e-12])])
        tp, fp = round(tpr[i] * members), round(fpr[i] * others)
        tpr_low, tpr_high = clopper_pearson(tp, members, alpha)
        fpr_low, fpr_high = clopper_pearson(fp, others, alpha)
        for gain, loss in ((tpr_low - delta, fpr_high), ((1 - fpr_high) - delta, 1 - tpr_low)):
            if gain > 0 and loss > 0:
                best = max(best, math.log(gain / loss))
    return best


def _against_ceiling(attack: dict[str, Any], is_member: np.ndarray, scores: np.ndarray, epsilon: float | None,
                     delta: float | None) -> dict[str, Any]:
    proven = proven_epsilon(is_member, scores, delta or 0.0)
    if epsilon is None:
        return {**attack, "auc_ceiling": None, "proven_epsilon": proven, "exceeds_dp_ceiling": False}
    for point in attack["tpr_at_fpr"]:
        point["ceiling"] = float(dp_tpr_ceiling(point["fpr"], epsilon, delta or 0.0))
    auc_ceiling = dp_auc_ceiling(epsilon, delta or 0.0)
    exceeds = attack["auc_ci"][0] > auc_ceiling or proven > epsilon
    return {**attack, "auc_ceiling": auc_ceiling, "proven_epsilon": proven, "exceeds_dp_ceiling": bool(exceeds)}


def membership_audit(weights: list[np.ndarray], settings: RunSettings, rounds: int, data: SiteData,
                     dp: DpSettings | None, epsilon: float | None, delta: float | None, shadow_models: int,
                     bootstrap: int = 1000, seed: int = 0, device: torch.device | None = None,
                     progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Both attacks on the received final model with the site's own members and non-members."""
    device = device or torch.device("cpu")
    labelled = _subset(data, np.isin(data.split, ("train", "test", "external")))
    is_member = labelled.split == "train"
    target = build_model(get_task(settings.task), settings.seed)
    set_weights(target, weights)
    phi = true_label_logit(target, labelled, device)
    scores = {"loss_threshold": phi}
    if shadow_models >= 2:
        phis, inside = shadow_phis(settings, labelled, rounds, dp, shadow_models - shadow_models % 2, seed, device,
                                   progress)
        scores["lira"] = lira_scores(phi, phis, inside)
    return {
        "members": int(is_member.sum()), "non_members": int((~is_member).sum()),
        "smallest_nonzero_fpr": 1.0 / max(int((~is_member).sum()), 1),
        "shadow_models": shadow_models - shadow_models % 2 if shadow_models >= 2 else 0,
        "shadow_training": {"epochs": max(1, rounds) * settings.local_epochs, "dp": dp is not None,
                            "noise_multiplier": dp.noise_multiplier if dp else None,
                            "max_grad_norm": dp.max_grad_norm if dp else None},
        "epsilon": epsilon, "delta": delta, "bootstrap": bootstrap,
        "attacks": {name: _against_ceiling(evaluate_attack(is_member, s, bootstrap, seed + i), is_member, s, epsilon,
                                           delta) for i, (name, s) in enumerate(scores.items())},
    }


def run(audit: AuditInputs, report: Mapping[str, Any]) -> dict[str, Any]:
    return {"membership_inference": _final_model_audit(audit, report["privacy_budget"])}


def _final_model_audit(audit: AuditInputs, budget: Mapping[str, Any]) -> dict[str, Any]:
    """Both attacks on the last final model whose run settings the site knows, or why none ran."""
    usable = [m for m in audit.received if m.run_id in audit.settings]
    if not usable:
        return {"skipped": "this site holds no final shared model (received models are kept from this version of "
                "spine-fl on, in <state_dir>/received)"}
    model = usable[-1]
    settings = audit.settings[model.run_id]
    try:
        data = load_site(audit.site.data_dir, get_task(settings.task), settings.image_size)
    except SiteDataError as exc:
        return {"skipped": f"the site's data could not be loaded for task {settings.task}: {exc}"}
    dp, eps, delta = None, None, None
    if settings.dp:
        mine = [r for r in audit.privacy_records if r.run_id == model.run_id]
        if mine:
            dp = DpSettings(mine[-1].noise_multiplier, mine[-1].max_grad_norm)
        else:
            dp = DpSettings(plan_round(settings, int((data.split == "train").sum())).noise_multiplier,
                            settings.max_grad_norm)
        row = next((r for r in budget.get("runs", []) if r["run_id"] == model.run_id), None)
        if row is not None:
            eps, delta = row["epsilon"], row["delta"]
    audit.progress(f"membership inference on run {model.run_id}'s final model")
    result = membership_audit(model.weights, settings, model.round, data, dp, eps, delta, audit.shadow_models,
                              bootstrap=audit.bootstrap, seed=audit.seed, device=pick_device(),
                              progress=audit.progress)
    return {"run_id": model.run_id, "round": model.round, "task": settings.task, **result}


def reasons(report: Mapping[str, Any]) -> list[Reason]:
    mia = report["membership_inference"]
    if "skipped" in mia:
        return [reason("attention", "membership", f"Membership inference was not run: {mia['skipped']}.")]
    out = []
    for name, attack in mia["attacks"].items():
        label = {"loss_threshold": "loss-threshold attack", "lira": "LiRA attack"}.get(name, name)
        low, high = attack["auc_ci"]
        numbers = f"AUC {attack['auc']:.2f} (95% CI {low:.2f}-{high:.2f})"
        if attack["exceeds_dp_ceiling"]:
            out.append(reason("fail", "membership", f"The {label} on the final model beats what epsilon "
                              f"{mia['epsilon']:.2f} allows ({numbers}, DP ceiling AUC {attack['auc_ceiling']:.2f}; "
                              f"it proves epsilon >= {attack['proven_epsilon']:.2f}): the DP guarantee does not "
                              "hold as accounted."))
        elif low >= CLEAR_LEAK_AUC:
            out.append(reason("fail", "membership", f"The {label} tells this site's training patients from its "
                              f"held-out patients: {numbers}. The shared model leaks who was in training."))
        elif low > ABOVE_CHANCE_AUC:
            out.append(reason("attention", "membership", f"The {label} does better than chance: {numbers}"
                              + (", within what the DP guarantee allows." if mia["epsilon"] is not None else ".")))
    if not out:
        shown = "; ".join(f"{n.replace('_', ' ')} AUC {a['auc']:.2f} (95% CI {a['auc_ci'][0]:.2f}-{a['auc_ci'][1]:.2f})"
                          for n, a in mia["attacks"].items())
        out.append(reason("pass", "membership", f"Membership attacks on the final model with this site's "
                          f"{mia['members']} training and {mia['non_members']} held-out patients stay below the "
                          f"attention threshold (lower 95% bound of the AUC at most {ABOVE_CHANCE_AUC:.2f}, where "
                          f"0.50 is guessing): {shown}."))
    return out
