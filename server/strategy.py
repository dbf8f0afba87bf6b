"""Flower's own strategies, configured from RunSettings, wrapped to record per-site metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any, Callable

from flwr.common import Parameters, Scalar, log, ndarrays_to_parameters
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedProx, Strategy

from spine_fl.server.coordinator_record import CoordinatorRecord
from spine_fl.server.preflight import PreflightRequest, preflight
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings


def round_config(settings: RunSettings, sites: list[str], offset: int = 0,
                 run_key: str = "") -> Callable[[int], dict[str, Scalar]]:
    """What every site receives with each round: the run's settings, the site order, the round
    (counted across coordinator restarts) and the run's key (sites' per-run budget survives them)."""

    def config(server_round: int) -> dict[str, Scalar]:
        return {**settings.to_run_config(), protocol.ROUND: server_round + offset, protocol.SITES: ",".join(sites),
                protocol.RUN_KEY: run_key}

    return config


def weighted_mean(reports: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean of each numeric metric the sites reported (site_index excluded). A site
    that withheld its metrics (protocol.WITHHELD, 0 examples, no metrics) takes no part."""
    reports = [(n, m) for n, m in reports if n > 0 and not m.get(protocol.WITHHELD)]
    out: dict[str, Scalar] = {}
    for key in sorted({k for _, m in reports for k in m if k != protocol.SITE_INDEX and _numeric(m[k])}):
        pairs = [(n, float(m[key])) for n, m in reports if key in m and _numeric(m[key])]
        total = sum(n for n, _ in pairs)
        out[key] = sum(n * v for n, v in pairs) / total if total else float("nan")
    return out


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_strategy(settings: RunSettings, initial: list, sites: list[str], offset: int = 0,
                   run_key: str = "") -> Strategy:
    common: dict[str, Any] = dict(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=settings.min_sites,
        min_evaluate_clients=settings.min_sites,
        min_available_clients=settings.min_sites,
        on_fit_config_fn=round_config(settings, sites, offset, run_key),
        on_evaluate_config_fn=round_config(settings, sites, offset, run_key),
        initial_parameters=ndarrays_to_parameters(initial),
        accept_failures=True,
        fit_metrics_aggregation_fn=weighted_mean,
        evaluate_metrics_aggregation_fn=weighted_mean,
    )
    if settings.strategy == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    if settings.strategy == "fedadam":
        return FedAdam(eta=settings.server_learning_rate, eta_l=settings.learning_rate, tau=1e-3, **common)
    return FedAvg(**common)


def _site_name(sites: list[str], metrics: dict[str, Scalar]) -> str:
    index = int(metrics.get(protocol.SITE_INDEX, -1))
    return sites[index] if 0 <= index < len(sites) else f"unknown-{index}"


@dataclass
class RoundLog:
    """What the coordinator learns per round: sites' evaluation and privacy reports, refusals."""

    sites: list[str]
    min_sites: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    trained_rounds: list[int] = field(default_factory=list)
    dropouts: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    on_round: Callable[[dict[str, Any]], None] | None = None

    _round_started: float = field(default_factory=time.monotonic)

    failed_rounds: list[int] = field(default_factory=list)
    train_examples: dict[str, int] = field(default_factory=dict)  # per site, from its last update

    PERSISTED = ("rounds", "privacy", "refusals", "trained_rounds", "dropouts", "failed_rounds", "train_examples")

    def state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.PERSISTED}

    def restore(self, state: dict[str, Any]) -> None:
        for name in self.PERSISTED:
            setattr(self, name, state.get(name, getattr(self, name)))

    def record_failed_round(self, server_round: int) -> None:
        self.failed_rounds.append(server_round)
        log(WARNING, "spine-fl: round %s did not complete (e.g. a site dropped before secure aggregation "
            "could mask its update); the global model is unchanged", server_round)

    def record_dropout(self, server_round: int | None, site: str, stage: str,
                       unanswered_since_round: int | None = None) -> None:
        """`unanswered_since_round`: not asked at all, its request of that round is still unanswered."""
        entry: dict[str, Any] = {"round": server_round, "site": site, "stage": stage}
        if unanswered_since_round is None:
            log(WARNING, "spine-fl: site %s did not reply in round %s (%s)", site, server_round, stage)
        else:
            entry["unanswered_since_round"] = unanswered_since_round
            log(WARNING, "spine-fl: site %s left out of round %s (%s): it has not answered its request of "
                "round %s", site, server_round, stage, unanswered_since_round)
        self.dropouts.append(entry)

    def record_fit(self, server_round: int, reports: list[tuple[int, dict[str, Scalar]]]) -> None:
        for examples, metrics in reports:
            self.train_examples[_site_name(self.sites, metrics)] = int(examples)
            self.privacy[_site_name(self.sites, metrics)] = {k: float(v) for k, v in metrics.items()
                                                              if k != protocol.SITE_INDEX and _numeric(v)}
        if len(reports) < self.min_sites:
            self.stop(f"round {server_round}: only {len(reports)} site(s) trained, fewer than min_sites = "
                      f"{self.min_sites}; the run ends here")
        else:
            self.trained_rounds.append(server_round)

    def record_refusal(self, server_round: int | None, refusal: dict[str, Any]) -> None:
        self.refusals.append({"round": server_round, **refusal})
        log(WARNING, "spine-fl: site %s refused (%s): %s", refusal.get("site", "?"), refusal.get("rule"),
            refusal.get("message"))

    def stop(self, reason: str) -> None:
        if not self.stopped:
            self.stopped = reason
            log(WARNING, "spine-fl: %s", reason)

    def record_evaluate(self, server_round: int, reports: list[tuple[int, dict[str, Scalar]]], failures: int) -> None:
        """Per-site metrics and their example-weighted means; sites that withheld their held-out
        metrics are listed under "withheld" (not in per_site: they reported nothing to show)."""
        withheld = sorted(_site_name(self.sites, m) for _, m in reports if m.get(protocol.WITHHELD))
        per_site = {_site_name(self.sites, m): {k: float(v) for k, v in m.items() if k != protocol.SITE_INDEX} | {"n": n}
                    for n, m in reports if not m.get(protocol.WITHHELD)}
        now = time.monotonic()
        entry: dict[str, Any] = {"round": server_round, "trained": server_round in self.trained_rounds,
                                 "seconds": round(now - self._round_started, 2)}
        self._round_started = now
        means = weighted_mean(reports)
        for key in protocol.ROUND_METRICS:
            entry[key] = means.get(key, float("nan"))
        entry["per_site"] = per_site
        entry["withheld"] = withheld
        entry["failures"] = failures
        entry["refusals"] = [r for r in self.refusals if r["round"] == server_round]
        entry["dropouts"] = sorted({d["site"] for d in self.dropouts if d["round"] == server_round})
        self.rounds.append(entry)
        if self.on_round:
            self.on_round(entry)


class RecordingStrategy(Strategy):
    """Delegates every step to Flower's strategy; keeps the sites' reports and refusals, and ends
    the run (by selecting no more sites) once fewer than min_sites train in a round.

    Before each round's training it runs the pre-flight (server/preflight.py): only the sites that
    will take part, with their pinned ledger key, are sent the round (in a SecAgg+ round the
    pre-flight rides on the setup stage and the workflow leaves the others out). Each train reply's ledger key
    is checked again and its privacy-ledger head kept in the coordinator's record.

    `offset` is the number of rounds completed before a coordinator restart (Flower counts this
    run's rounds from 1); `on_round_done(round, parameters)` is called after each evaluated round."""

    def __init__(self, inner: Strategy, log: RoundLog, record: CoordinatorRecord, offset: int = 0,
                 on_round_done: Callable[[int, Parameters], None] | None = None, site_wait_seconds: float = 3600.0):
        super().__init__()
        self.inner = inner
        self.site_wait_seconds = site_wait_seconds
        self.log = log
        self.record = record
        self.offset = offset
        self.on_round_done = on_round_done
        self._latest: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[override]
        instructions, request = self.select_for_setup(server_round, parameters, client_manager)
        return preflight(request) if request is not None else instructions

    def select_for_setup(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        """The sites selected for the round and the pre-flight to ask them, not yet asked: a SecAgg+
        round asks it in its setup stage's messages (server/secure_aggregation.py), any other in an
        exchange of its own (configure_fit)."""
        if self.log.stopped:
            return [], None
        if not client_manager.wait_for(self.log.min_sites, timeout=int(self.site_wait_seconds)):
            self.log.stop(f"round {server_round + self.offset}: only {client_manager.num_available()} site(s) "
                          f"connected within site_wait_seconds = {self.site_wait_seconds:g}, fewer than min_sites = "
                          f"{self.log.min_sites}; the run ends here (start the missing sites, then run again)")
            return [], None
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        if not instructions:
            return instructions, None
        return instructions, PreflightRequest(instructions, server_round, server_round + self.offset, self.record,
                                              self.log)

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[override]
        absolute = server_round + self.offset
        signed_by_others = []
        for _, res in results:
            site = _site_name(self.log.sites, res.metrics)
            problem = self.record.key_problem(site, str(res.metrics.get(protocol.LEDGER_KEY, "")))
            if problem:
                signed_by_others.append(site)
                self.log.record_refusal(absolute, {"site": site, "rule": "ledger_key", "message": problem,
                                                   "by": "coordinator"})
            else:
                self.record.record_reply(site, res.metrics)
        if signed_by_others:  # under SecAgg+ their updates are inside the sum: the round fails (retried
            return None, {}  # without them: the next pre-flight leaves them out)
        self.log.record_fit(absolute, [(r.num_examples, r.metrics) for _, r in results])
        aggregated = self.inner.aggregate_fit(server_round, results, failures)
        self._latest = aggregated[0]
        return aggregated

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[override]
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results: list[tuple[ClientProxy, Any]], failures):  # type: ignore[override]
        absolute = server_round + self.offset
        self.log.record_evaluate(absolute, [(r.num_examples, r.metrics) for _, r in results], len(failures))
        results = [(proxy, r) for proxy, r in results if r.num_examples > 0]  # withheld: nothing to average
        if self.on_round_done and self._latest is not None and absolute in self.log.trained_rounds:
            self.on_round_done(absolute, self._latest)
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):  # type: ignore[override]
        return self.inner.evaluate(server_round, parameters)
