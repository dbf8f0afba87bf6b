"""Seconds of privacy work per round at a site whose privacy ledger already holds 1,000 lines.

Not a benchmark suite (that is `spine-fl benchmark privacy`): a quick figure for issue 14's
"accounting in constant time". A round's privacy work is what a site does besides training: the
pre-flight check (with the coordinator's head), the site-policy mod's check, recording the spend
and reading the ledger's head for the reply. The first round in a process verifies and composes the
whole ledger (start-up); the rounds after it should not depend on the ledger's length.

    .venv/bin/python scripts/privacy_round_timing.py [--lines 1000] [--rounds 20] [--accountant rdp]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from opacus.accountants.analysis import rdp as rdp_analysis

from spine_fl.client.calibration import histogram_spend
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, SpendRecord, dataset_id
from spine_fl.client.privacy.round_checks import decide_round
from spine_fl.client.site_config import Site
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings
from spine_fl.simulations.synthetic.consortium import synthesize_consortium

RUN = "f" * 32


def _history(ledger: PrivacyLedger, lines: int, accountant: str) -> None:
    """`lines` earlier lines: runs of 20 rounds with their own noise, each ended by a recalibration release."""
    sigma_h, rate_h, steps_h = histogram_spend()
    for i in range(lines):
        run, rnd = f"{i // 21:032x}", i % 21 + 1
        if rnd == 21:
            ledger.append(SpendRecord(run, rnd, sigma_h, rate_h, steps_h, 1.0, 1e-4, accountant))
        else:
            ledger.append(SpendRecord(run, rnd, 2.0 + (i // 21) % 7 / 10, 0.125, 8, 1.0, 1e-4, accountant))


def _one_round(site: Site, run: RunSettings, ledger: PrivacyLedger, rnd: int, head: dict | None) -> dict:
    pre = decide_round(site, run, RUN, rnd, secagg_in_use=True, training=True, coordinator_head=head)
    assert pre.refusal is None and pre.assessed is not None, pre.refusal
    ledger.log.last()  # the pre-flight answer's head
    decided = decide_round(site, run, RUN, rnd, secagg_in_use=True, training=True)  # the site-policy mod
    assert decided.assessed is not None
    spend = decided.assessed.plan.round_spend
    ledger.append(SpendRecord(RUN, rnd, spend.noise_multiplier, spend.sample_rate, spend.steps, 1.0,
                              decided.assessed.plan.delta, run.accountant))
    lines, sha = ledger.log.last()  # the train reply's head
    return {protocol.LEDGER_DATASET: ledger.dataset, protocol.LEDGER_LINES: lines, protocol.LEDGER_SHA256: sha}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--accountant", default="rdp", choices=("rdp", "prv"))
    args = parser.parse_args()
    conversions = 0
    original = rdp_analysis.get_privacy_spent

    def counted(*a, **kw):
        nonlocal conversions
        conversions += 1
        return original(*a, **kw)

    rdp_analysis.get_privacy_spent = counted
    with tempfile.TemporaryDirectory() as tmp:
        (site_dir,) = synthesize_consortium(Path(tmp) / "data", 1, 11, ())
        site = Site(site_dir.name, site_dir, Path(tmp) / "state",
                    SitePolicy(require_secagg=False, epsilon_per_run=1e6, epsilon_lifetime=1e9,
                               max_rounds=10_000))
        run = RunSettings(task="rbp_tabular", rounds=10_000, batch_size=16, secagg=False, min_sites=1,
                          noise_multiplier=1.1, accountant=args.accountant)
        ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
        _history(ledger, args.lines, args.accountant)
        decide_round(site, run, RUN, 0, secagg_in_use=True, training=False)  # loads the site's data, untimed
        t0 = time.perf_counter()
        head = _one_round(site, run, ledger, 1, None)
        first = time.perf_counter() - t0
        times, counts = [], []
        for rnd in range(2, args.rounds + 2):
            conversions = 0
            t0 = time.perf_counter()
            head = _one_round(site, run, ledger, rnd, head)
            times.append(time.perf_counter() - t0)
            counts.append(conversions)
    print(f"ledger of {args.lines} lines, accountant {args.accountant}: first round in this process "
          f"(start-up) {first:.4f} s; then per round median {statistics.median(times):.4f} s "
          f"(min {min(times):.4f}, max {max(times):.4f}) over {len(times)} rounds; "
          f"RDP-to-epsilon conversions per round: {statistics.median(counts):g}")


if __name__ == "__main__":
    main()
