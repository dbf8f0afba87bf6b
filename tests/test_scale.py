"""Large consortia: SecAgg+ neighbourhoods (fewer shares than sites) and the 100-site scenario.

The protocol tests run Flower's own SecAgg+ — the coordinator's workflow (spine-fl's SpineSecAggPlus)
and every site's `secaggplus_mod` — in this process, each message handed straight from the workflow
to the addressed site's mod (no Ray, no network): 40 sites take a few seconds. They check what the
README's "Scale" section claims: the sum comes out exact, each site's secrets are shared with its
neighbourhood only, and a round survives k - threshold dropouts in a neighbourhood but not one more.
The 100-site run itself is not a test (it takes minutes); `spine-fl simulate --scenario scale100`
and `spine-fl benchmark scaling` measure it. The smoke at the end (12 sites, one round on Ray) is
marked slow like the other end-to-end runs.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, ConfigRecord, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from spine_fl.server.secure_aggregation import (
    MAX_SITES_PER_AGGREGATION,
    SpineSecAggPlus,
    neighbourhood,
    quantization_error_bound,
    secagg_fit_workflow,
)
from spine_fl.shared.config import ConfigError, RunSettings, load_scenario
from spine_fl.simulations.runner import load

SHAPE = (4, 3)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps every message with the identity of the task sending it, which its engines set
    (run_simulation does); here the test plays the coordinator (restored afterwards)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


class _Sites:
    """A consortium of `n` sites, each with a Flower Context (where secaggplus_mod keeps its state)
    and a model whose every weight is site-specific; `drop` names sites that fail a given stage."""

    def __init__(self, n: int, drop: dict[str, set[int]] | None = None):
        self.ids = list(range(101, 101 + n))
        self.weights = {nid: [np.full(SHAPE, 0.01 * i, dtype=np.float64), np.array([-0.5 + 0.02 * i])]
                        for i, nid in enumerate(self.ids)}
        self.examples = {nid: 100 + 7 * i for i, nid in enumerate(self.ids)}
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
                         for nid in self.ids}
        self.drop = drop or {}
        self.neighbours: dict[int, set[int]] = {}  # who holds shares of whose secrets (stage "share_keys")

    def fit(self, msg: Message, ctxt: Context) -> Message:
        nid = msg.metadata.dst_node_id
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(self.weights[nid]), self.examples[nid], {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    def expected(self, ids: Iterable[int]) -> list[np.ndarray]:
        ids = list(ids)
        total = sum(self.examples[i] for i in ids)
        return [sum(self.examples[i] * self.weights[i][k] for i in ids) / total for k in range(2)]


class _Grid:
    """Hands each message to its site's secaggplus_mod, as Flower's engines do, and notes the
    neighbourhoods from the public keys each site is sent."""

    def __init__(self, sites: _Sites):
        self.sites = sites

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for sent in messages:
            msg = copy.deepcopy(sent)  # as if it travelled: the sites' mods change what they receive
            nid = msg.metadata.dst_node_id
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
            if stage == Stage.SHARE_KEYS:
                self.sites.neighbours[nid] = {int(k) for k in msg.content.config_records[RECORD_KEY_CONFIGS]
                                              if k != Key.STAGE}
            if nid in self.sites.drop.get(stage, set()):
                replies.append(Message(Error(code=0, reason="site dropped out"), reply_to=msg))
                continue
            replies.append(secaggplus_mod(msg, self.sites.contexts[nid], self.sites.fit))
        return replies

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover - unused by SecAgg+
        raise NotImplementedError


def _run(workflow: SpineSecAggPlus, sites: _Sites, grid: _Grid | None = None,
         strategy: Any = None) -> tuple[list[np.ndarray] | None, set[int]]:
    """One SecAgg+ round over `sites`; the aggregate (None when the round failed) and who trained."""
    grid = grid or _Grid(sites)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    n = len(sites.ids)
    strategy = strategy or FedAvg(min_fit_clients=n, min_available_clients=n, fraction_fit=1.0)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    for nid in sites.ids:
        legacy.client_manager.register(GridClientProxy(nid, grid, 1))  # type: ignore[arg-type]
    initial = [np.zeros(SHAPE), np.zeros(1)]
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(initial), keep_input=True)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    workflow(grid, legacy)  # type: ignore[arg-type]
    if _unchanged(legacy, initial):  # SecAgg+ halted: the model stays as it was
        return None, set()
    out = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD],
                                                                  keep_input=True))
    dropped = set().union(*sites.drop.values()) if sites.drop else set()
    return out, set(sites.ids) - dropped


def _unchanged(legacy: LegacyContext, initial: list[np.ndarray]) -> bool:
    now = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD],
                                                                  keep_input=True))
    return all(np.array_equal(a, b) for a, b in zip(now, initial))


def _workflow(num_shares: int = 15, fraction: float = 0.67) -> SpineSecAggPlus:
    workflow = secagg_fit_workflow(RunSettings(task="rbp_tabular", secagg_num_shares=num_shares,
                                               secagg_reconstruction_threshold=fraction))
    assert isinstance(workflow, SpineSecAggPlus)
    return workflow


def _close(got: list[np.ndarray], want: list[np.ndarray]) -> bool:
    """Equal up to SecAgg+'s rounding (README: below 4e-5 per weight for 100-patient sites)."""
    bound = quantization_error_bound(RunSettings(task="rbp_tabular"), 100)
    return all(np.allclose(g, w, rtol=0, atol=bound) for g, w in zip(got, want))


# -- what Flower is asked for ---------------------------------------------------------------------------

def test_shares_every_site_up_to_num_shares_then_a_neighbourhood() -> None:
    assert [neighbourhood(n, 15, 0.67) for n in (2, 3, 10, 15)] == [(2, 2), (3, 2), (10, 7), (15, 10)]
    assert [neighbourhood(n, 15, 0.67) for n in (16, 100, 1000)] == [(15, 10)] * 3
    assert neighbourhood(100, 21, 0.6) == (21, 13)
    workflow = _workflow()
    # before a round: Flower's "all selected sites" (what benchmarks that copy the settings read)
    assert (workflow.num_shares, workflow.reconstruction_threshold) == (1.0, 0.67)
    assert workflow.shares_for(100) == (15, 10)
    assert MAX_SITES_PER_AGGREGATION == 1023  # 1023 x 2**22 < 2**32: the masked sum cannot wrap around


def test_run_settings_refuse_shares_flower_or_the_security_argument_cannot_use(tmp_path: Path) -> None:
    for bad in ({"secagg_num_shares": 14}, {"secagg_num_shares": 1}, {"secagg_reconstruction_threshold": 0.5},
                {"secagg_reconstruction_threshold": 1.2}):
        with pytest.raises(ConfigError, match=re.escape(next(iter(bad)))):
            RunSettings(**bad)
    RunSettings(secagg=False, secagg_num_shares=2)  # no SecAgg+: nothing to share
    scenario = load("scale100")
    assert (scenario.consortium.sites, scenario.run.secagg_num_shares, scenario.run.rounds) == (100, 41, 3)
    assert secagg_fit_workflow(scenario.run).shares_for(100) == (41, 25)  # type: ignore[union-attr]
    assert secagg_fit_workflow(RunSettings()).shares_for(100) == (31, 21)  # type: ignore[union-attr]
    assert secagg_fit_workflow(RunSettings()).shares_for(31) == (31, 21)  # type: ignore[union-attr]
    assert scenario.run.dp and scenario.run.secagg
    path = tmp_path / "s.toml"
    path.write_text('[run]\ntask = "rbp_tabular"\nsecagg_num_shares = 10\nmin_sites = 2\n')
    with pytest.raises(ConfigError, match=r"\[run\] secagg_num_shares = 10: must be an odd number"):
        load_scenario(path)
    with pytest.raises(ConfigError, match=r"sites = 1024: more than the 1023 sites one SecAgg\+ aggregation"):
        replace(scenario, consortium=replace(scenario.consortium, sites=1024))
    replace(scenario, consortium=replace(scenario.consortium, sites=1024), run=replace(scenario.run, secagg=False))


# -- the protocol, in process ------------------------------------------------------------------------

def test_small_consortium_shares_with_every_site_as_before() -> None:
    sites = _Sites(3)
    workflow = _workflow()
    out, trained = _run(workflow, sites)
    assert out is not None and _close(out, sites.expected(trained))
    assert workflow.last_round == {"sites": 3, "num_shares": 3, "threshold": 2}
    assert all(len(nb) == 3 for nb in sites.neighbours.values())


def test_neighbourhoods_aggregate_exactly_and_share_with_k_sites_only(caplog: pytest.LogCaptureFixture) -> None:
    sites = _Sites(40)
    workflow = _workflow(num_shares=7)
    with caplog.at_level(logging.INFO, logger="spine_fl.server"):
        out, trained = _run(workflow, sites)
    assert out is not None and _close(out, sites.expected(trained))
    assert workflow.last_round == {"sites": 40, "num_shares": 7, "threshold": 5}
    assert {len(nb) for nb in sites.neighbours.values()} == {7}  # itself and 3 on either side
    assert all(nid in nb for nid, nb in sites.neighbours.items())
    assert "SecAgg+ over 40 sites: each site's secrets in 7 shares (its neighbourhood), 5 of them unmask it" \
        in caplog.text
    assert workflow.num_shares == 1.0  # restored after the round


class _DroppingGrid(_Grid):
    """Drops `how_many` of the first site's neighbours at the masked-vector stage (after the key
    exchange: neighbourhoods are shuffled every round, so they are chosen once they are known)."""

    def __init__(self, sites: _Sites, how_many: int):
        super().__init__(sites)
        self.how_many = how_many

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else ""
        if stage == Stage.COLLECT_MASKED_VECTORS:
            target = self.sites.ids[0]
            self.sites.drop[stage] = set(sorted(self.sites.neighbours[target] - {target})[:self.how_many])
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("how_many, survives", [(2, True), (3, False)])
def test_a_neighbourhood_survives_k_minus_threshold_dropouts_but_not_one_more(
        how_many: int, survives: bool, caplog: pytest.LogCaptureFixture) -> None:
    sites = _Sites(25)
    with caplog.at_level(logging.INFO):
        out, trained = _run(_workflow(num_shares=7), sites, _DroppingGrid(sites, how_many))  # k = 7, threshold 5
    assert len(sites.drop[Stage.COLLECT_MASKED_VECTORS]) == how_many
    if survives:
        assert out is not None and len(trained) == 23 and _close(out, sites.expected(trained))
    else:
        assert out is None, f"{how_many} dropouts in one neighbourhood of 7 (threshold 5) should fail the round"
        assert "Insufficient available nodes" in caplog.text  # Flower's threshold check, not another error


# -- the real stack: 12 virtual sites on Ray --------------------------------------------------------------

@pytest.mark.slow
def test_twelve_sites_one_round_with_neighbourhoods_on_ray(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json

    from spine_fl.simulations.runner import build_consortium, run_federation, virtual_sites

    base = load("scale100")
    scenario = replace(base, consortium=replace(base.consortium, sites=12),
                       run=replace(base.run, rounds=1, min_sites=8, secagg_num_shares=5))
    dirs = build_consortium(scenario, tmp_path / "sites")
    with caplog.at_level(logging.INFO, logger="spine_fl.server"):
        run_federation(scenario, virtual_sites(scenario, dirs, tmp_path / "run"), tmp_path / "run")
    federation = json.loads((tmp_path / "run" / "federation.json").read_text())
    assert federation["status"] == "completed", federation["stop_reason"]
    assert [r["round"] for r in federation["rounds"]] == [1]
    assert "SecAgg+ over 12 sites: each site's secrets in 5 shares (its neighbourhood), 3 of them unmask it" \
        in caplog.text


def test_a_site_gone_by_the_setup_stage_is_left_out_and_the_others_aggregate(caplog: pytest.LogCaptureFixture) -> None:
    """A site that refuses or is silent at the setup stage (where the pre-flight is asked) never handed
    out a share: the round goes on among the others instead of failing at the unmask stage."""
    sites = _Sites(5, drop={Stage.SETUP: {103}})
    workflow = _workflow()
    with caplog.at_level(logging.INFO):
        out, trained = _run(workflow, sites)
    assert out is not None and trained == {101, 102, 104, 105} and _close(out, sites.expected(trained))
    assert 103 not in set().union(*sites.neighbours.values())  # nobody was sent its key
    assert "Not enough shares" not in caplog.text


class _Preflight:
    """A stand-in for server/preflight.py's PreflightRequest: `refusing` sites answer not ready."""

    def __init__(self, instructions: list, refusing: set[int]):
        self.instructions, self.refusing, self.stopped = instructions, refusing, False

    def record_for(self, node_id: int) -> ConfigRecord:
        return ConfigRecord({"asked": node_id})

    def ready(self, reply: Message) -> bool:
        return reply.metadata.src_node_id not in self.refusing

    def enough(self, ready: int) -> bool:
        self.stopped = ready < 2
        return not self.stopped


class _AskingStrategy(FedAvg):
    """FedAvg whose selection comes with a pre-flight, as spine-fl's RecordingStrategy's does."""

    def __init__(self, n: int, refusing: set[int]):
        super().__init__(min_fit_clients=n, min_available_clients=n, fraction_fit=1.0)
        self.refusing, self.requests = refusing, []

    def select_for_setup(self, server_round: int, parameters: Any, client_manager: Any) -> tuple[list, Any]:
        instructions = self.configure_fit(server_round, parameters, client_manager)
        self.requests.append(_Preflight(instructions, self.refusing))
        return instructions, self.requests[-1]


class _RefusingGrid(_Grid):
    """Sites in `refusing` answer a setup message that carries the pre-flight with a refusal (no keys)."""

    def __init__(self, sites: _Sites, refusing: set[int]):
        super().__init__(sites)
        self.refusing, self.setups = refusing, []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if messages and str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) == Stage.SETUP:
            self.setups.append(sorted(m.metadata.dst_node_id for m in messages))
            refused = [m for m in messages if m.metadata.dst_node_id in self.refusing and "preflight" in m.content]
            replies = super().send_and_receive([m for m in messages if m not in refused], timeout=timeout)
            return replies + [Message(Error(code=0, reason="refused"), reply_to=m) for m in refused]
        return super().send_and_receive(messages, timeout=timeout)


def test_sites_left_out_by_the_preflight_get_a_round_set_up_for_the_ready_sites_only() -> None:
    """Flower fixes the shares and the threshold from the sites selected (4: 3 to unmask) and the
    sites make their shares with them; with 2 of 4 refusing, 2 ready sites could never reach 3. So
    the setup is sent again to the ready sites only (2 sites: 2 shares, 2 to unmask) and the round
    aggregates them."""
    sites, refusing = _Sites(4), {103, 104}
    grid, workflow = _RefusingGrid(sites, refusing), _workflow()
    out, _ = _run(workflow, sites, grid, _AskingStrategy(4, refusing))
    assert grid.setups == [[101, 102, 103, 104], [101, 102]]  # asked all, then set up among the ready
    assert workflow.last_round == {"sites": 2, "num_shares": 2, "threshold": 2}
    assert out is not None and _close(out, sites.expected({101, 102}))


def test_too_few_ready_sites_end_the_round_at_the_setup_stage() -> None:
    sites, refusing = _Sites(3), {102, 103}
    strategy = _AskingStrategy(3, refusing)
    out, _ = _run(_workflow(), sites, _RefusingGrid(sites, refusing), strategy)
    assert out is None and strategy.requests[0].stopped  # the run stops there: nobody reached the training stage
    assert not any(sites.neighbours.values())  # no key was ever handed out
