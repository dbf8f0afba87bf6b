"""What a privacy ledger has spent, composed, at one verified head of the ledger.

Issue 14: a site used to recompute epsilon from its whole ledger several times per round, so a site
that had trained for years paid for all of it every round. A `Spent` holds the composition of every
line (shared/training/accounting.Composition: the summed RDP curve and the mechanisms' steps) over
the dataset's lifetime and per run key, and the (run, round) pairs already charged, at the head it
was composed at: the ledger's line count and its last line's SHA-256. `then` adds new lines in time
independent of the ledger's length; `figures` answers a round's budget question once per head.

A Spent is only ever built from lines that verified (PrivacyLedger.spent), and only extended when
the verified ledger still holds its head; so it always equals a full recomputation of the ledger as
it stands (tests/test_privacy_accounting.py checks both agree to the last bit).

A patient's privacy loss is the composition of every release that used that patient, whichever
dataset id (ledger) it was charged to (issue 10: one dummy row in clinical.csv is a new dataset id, an
empty ledger). `plus` adds other ledgers' compositions to this one's lifetime and per-run figures
(privacy_ledger.spent_for_patients decides which ledgers count); the rounds charged, the line count and
the head stay this ledger's own, so a replay is still judged against the ledger the round is charged to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from spine_fl.client.privacy.signed_log import GENESIS
from spine_fl.shared.training.accounting import EMPTY, Composition, compose

# (run key, round, noise multiplier, sample rate, steps): one ledger line as the budget sees it
Line = tuple[str, int, float, float, int]
Step = tuple[float, float, int]


@dataclass(frozen=True)
class Figures:
    """The budget question of one round: epsilon of the run and of the lifetime once `step` is spent."""

    epsilon_run_after: float
    epsilon_lifetime_after: float
    steps_run_after: int
    rounds_in_run: int  # rounds (lines) this run key already holds


@dataclass(frozen=True, eq=False)
class Spent:
    """One privacy ledger composed at one head: over its lifetime, per run key, and which rounds each
    run key has charged. Immutable (but for the memo of figures already asked at this head)."""

    lines: int = 0
    last_sha256: str = GENESIS
    lifetime: Composition = EMPTY
    runs: Mapping[str, Composition] = field(default_factory=lambda: MappingProxyType({}))
    rounds: Mapping[str, frozenset[int]] = field(default_factory=lambda: MappingProxyType({}))
    # the patient-set digest every line of the ledger names (privacy_ledger: the signed record of whose
    # data it spent), None when a line names none (written before issue 10) or lines disagree
    patients: str | None = None
    also: tuple[str, ...] = ()  # other ledgers (dataset ids) whose spending `plus` composed in
    # figures already computed at this head: the pre-flight's and the training round's checks ask alike
    _asked: dict[tuple, Figures] = field(default_factory=dict, init=False, compare=False, repr=False)

    def run(self, run_key: str) -> Composition:
        return self.runs.get(run_key, EMPTY)

    def charged(self, run_key: str, server_round: int) -> bool:
        """Is this run key's round already in the ledger (a replay, never charged twice)?"""
        return server_round in self.rounds.get(run_key, frozenset())

    def then(self, lines: Iterable[Line], count: int, last_sha256: str) -> Spent:
        """This composition followed by `lines`, now at head (`count`, `last_sha256`)."""
        lines = list(lines)
        by_run: dict[str, tuple[list[Step], set[int]]] = {}
        for run_key, server_round, sigma, rate, steps in lines:
            entries, charged = by_run.setdefault(run_key, ([], set()))
            entries.append((sigma, rate, steps))
            charged.add(int(server_round))
        runs, rounds = dict(self.runs), dict(self.rounds)
        for run_key, (entries, charged) in by_run.items():  # each composition folds its lines in ledger order
            runs[run_key] = compose(entries, runs.get(run_key, EMPTY))
            rounds[run_key] = rounds.get(run_key, frozenset()) | charged
        lifetime = compose(((sigma, rate, steps) for _, _, sigma, rate, steps in lines), self.lifetime)
        return Spent(count, last_sha256, lifetime, MappingProxyType(runs), MappingProxyType(rounds))

    def plus(self, others: Iterable[tuple[str, Spent]]) -> Spent:
        """This ledger's composition with every (dataset id, Spent) of `others` composed into its lifetime
        and per-run figures; its head, rounds charged and patient digest unchanged."""
        lifetime, runs, also = self.lifetime, dict(self.runs), list(self.also)
        for name, other in others:
            lifetime = compose(other.lifetime.mechanisms, lifetime)
            for run_key, composition in other.runs.items():
                runs[run_key] = compose(composition.mechanisms, runs.get(run_key, EMPTY))
            also.append(name)
        return Spent(self.lines, self.last_sha256, lifetime, MappingProxyType(runs), self.rounds, self.patients,
                     tuple(also))

    def figures(self, run_key: str, step: Step | None, delta: float, accountant: str) -> Figures:
        """Epsilon of the run and the lifetime after `step` (None: nothing more is spent), at `delta`;
        computed once per head and question."""
        key = (run_key, step, float(delta), accountant)
        if key not in self._asked:
            run, lifetime = self.run(run_key), self.lifetime
            if step is not None:
                run, lifetime = run.then(*step), lifetime.then(*step)
            self._asked[key] = Figures(run.epsilon(delta, accountant), lifetime.epsilon(delta, accountant),
                                       run.steps, len(self.rounds.get(run_key, ())))
        return self._asked[key]


NOTHING = Spent()
