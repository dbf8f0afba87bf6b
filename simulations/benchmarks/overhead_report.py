"""The overhead suite's figures in words: the headline, what the rest of the round is, the README section.

Everything here is read from the suite's report (overhead.run), so the text cannot drift from
the measurement it describes.
"""

from __future__ import annotations

from typing import Any

SITES_KEY = "sites (all virtual sites together)"
# spine-fl's own privacy work at a site, as profiling.COMPONENTS labels them; none of these nests in
# another (the pre-flight's check is decide_round too), so they add up
PRIVACY_WORK = ("site policy and budget check (decide_round)", "egress ledger entry (record_egress)",
                "privacy ledger append", "charged reply kept (keep_reply)", "received model saved (save_received)")
SHOWN = 0.02  # components under 20 ms per round are left out of the text (they stay in the file)


def verdict(target: dict[str, Any]) -> str:
    """"met" / "not met" when the median, paired and fastest-round ratios agree; else "unclear"."""
    keys = ("measured", "measured_paired", "measured_fastest_rounds")
    values = [target[k] for k in keys if target.get(k) is not None]
    if not values:
        return "not measured"
    below = [v <= target["at_most"] for v in values]
    return "met" if all(below) else "not met" if not any(below) else "unclear: the estimates straddle the target"


def headline(report: dict[str, Any]) -> str:
    parts = []
    for name, c in report["configs"].items():
        t = c.get("target")
        if t:
            parts.append(f"{name}: {t['ratio']} {t['measured']}x median, {t['measured_paired']}x paired, "
                         f"{t['measured_fastest_rounds']}x fastest rounds (target <= {t['at_most']}x: {verdict(t)})")
        else:
            parts.append(f"{name}: spine-fl / plain in-process {c['ratios']['spine-fl / plain in-process']}x")
    return "; ".join(parts)


def remaining(report: dict[str, Any]) -> list[str]:
    """Where the seconds over the plain stack go, per configuration and from the profile."""
    lines = []
    for name, c in report["configs"].items():
        over = c["seconds_per_round_over_plain"]
        med = {arm: s["median"] for arm, s in c["round_seconds"].items()}
        lines.append(f"{name}: medians spine-fl {med['spine-fl']} s, plain Flower {med['plain Flower']} s, "
                     f"{c['in_process_arm']} in-process {med['plain in-process']} s per round. Flower + Ray over the "
                     f"in-process loop: {over['flower_and_ray (plain Flower - plain in-process)']} s; spine-fl over "
                     f"plain Flower: {over['spine_fl (spine-fl - plain Flower)']} s.")
    profile = report.get("profile")
    sites = (profile or {}).get(SITES_KEY)
    if sites:
        total = sites["total_seconds_per_round"]
        shown = [(label, s) for label, s in sites["components_seconds_per_round"].items() if s >= SHOWN]
        parts = [f"{label.strip()} {s} s ({s / total:.0%})" for label, s in shown]
        lines.append(f"Profile of spine-fl's {profile['config']} round (cProfile, rounds "
                     f"{profile['rounds_summarised']}; "
                     f"profiling slows everything, Python-heavy code more than torch's C code: read the shares "
                     f"as upper bounds for Python work): the sites' work sums to {total} s per round over all "
                     f"virtual sites; inclusive components (nested ones overlap): " + "; ".join(parts) + ".")
        comps = sites["components_seconds_per_round"]
        withhold = next((v for k, v in sites.get("callees_seconds_per_round", {}).get("evaluate", {}).items()
                         if k.endswith("(withhold_reason)")), 0.0)
        privacy = sum(comps.get(label, 0.0) for label in PRIVACY_WORK) + withhold
        fingerprint = next((v for k, v in comps.items() if k.endswith("(dataset_id)")), 0.0)
        lines.append(f"spine-fl's own privacy work at the sites (policy and budget checks incl. the pre-flight's, the "
                     f"evaluation budget check, ledgers, kept replies) sums to {privacy:.3f} s per round "
                     f"({privacy / total:.0%} of the sites' work); {fingerprint} s of it is the dataset fingerprint "
                     f"(privacy_ledger.dataset_id: the patient ids and each manifest image's hash, cached per file and "
                     f"re-checked by a stat of every image each time a check runs), "
                     f"while the accounting itself (RDP composition, epsilon) is "
                     f"{comps.get('RDP composition (accounting.compose)', 0.0)} s.")
        libs = sites["self_seconds_per_round_by_library"]
        lines.append("Sites' self time by library per round: " +
                     ", ".join(f"{k} {v} s" for k, v in libs.items() if v >= SHOWN) + ".")
    coordinator = (profile or {}).get("coordinator")
    if coordinator:
        comps = coordinator["components_seconds_per_round"]
        lines.append("Coordinator per round (wall time in its thread, mostly waiting for the sites): " +
                     "; ".join(f"{label} {s} s" for label, s in comps.items()) + ".")
    return lines


def readme_section(report: dict[str, Any]) -> list[str]:
    w = report["workload"]
    body = [f"spine-fl's round against the same round in plain PyTorch/Opacus (in-process, every site in turn) and "
            f"in a minimal plain Flower app (Flower's SecAggPlusWorkflow + secaggplus_mod for SecAgg+, plain Opacus "
            f"for DP): task {w['task']}, {w['sites']} sites, {w['model']} ({w['parameters']:,} parameters), "
            f"{w['rounds_per_run']} rounds per run x {w['repeats']} repeat(s), rounds {w['rounds_measured']}; "
            f"{report['date']}, commit {str(report['commit']['sha'])[:12]}"
            f"{' (uncommitted changes)' if report['commit']['dirty'] else ''}; {report['machine']['note']}.", "",
            "| configuration | spine-fl s/round | plain Flower s/round | plain in-process s/round | spine-fl / "
            "in-process (paired) | spine-fl / plain Flower (paired) | target |", "|---|---|---|---|---:|---:|---|"]
    for name, c in report["configs"].items():
        cell = {arm: f"{s['median']} ({s['min']}-{s['max']})" for arm, s in c["round_seconds"].items()}
        t = c.get("target")
        target = (f"{t['ratio']} <= {t['at_most']}: {verdict(t)} (fastest rounds "
                  f"{t['measured_fastest_rounds']})" if t else "")
        r, p = c["ratios"], c["ratios_paired"]
        body.append(f"| {name} | {cell['spine-fl']} | {cell['plain Flower']} | {cell['plain in-process']} | "
                    f"{r['spine-fl / plain in-process']} ({p['spine-fl / plain in-process']}) | "
                    f"{r['spine-fl / plain Flower']} ({p['spine-fl / plain Flower']}) | {target} |")
    threads = next(iter(report["configs"].values()))["threads"]
    body += ["", f"Medians (min-max) of the rounds; ratios of medians, paired ratios in brackets (each Flower round "
             f"over the in-process round right after it: both saw the same load). The in-process arm trains the sites "
             f"one after another on {threads['in_process_torch_threads']} torch thread(s); Flower's engine runs "
             f"{threads['flower_sites_in_parallel']} site(s) at once on {threads['flower_site_torch_threads']} "
             "thread(s) each. What the rest is:", ""]
    body += [f"- {line}" for line in report.get("remaining_difference", [])]
    return body
