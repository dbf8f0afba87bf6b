"""Flower's SecAgg+ as the fit workflow: the coordinator only ever sees the sum of the updates.

Ranges (Flower's SecAggPlusWorkflow quantises *full weights*, not DP-clipped gradients):
- DP clipping (per-sample gradients, max_grad_norm) and SecAgg+ clipping are unrelated bounds.
  SecAgg+ clips every weight to +-clipping_range before quantising; spine-fl's models keep
  weights well under 1 (GroupNorm scales near 1), so the default 8 never clips, and each site
  refuses to send a model with a weight beyond the range instead of letting it be distorted.
- Each site's weights are scaled by num_examples / max_weight before quantising to
  quantization_range levels over [-clipping_range, clipping_range] (one level: 2 * clipping_range /
  quantization_range) and stochastically rounded, so each site's quantised update is off by under one
  level per weight; the sum over k sites is divided by their total examples N >= k * the smallest
  site's, so the aggregate is off by under 2 * clipping_range / quantization_range * max_weight /
  smallest site's num_examples per weight (2 * 8 / 2**22 * 1000 / 100 ~ 4e-5 for 100-patient sites),
  however many sites: far below DP-SGD's noise. max_weight
  must be at least the largest site's training-set size (1000 covers the consortium's cohorts).
- The masked sum is taken modulo 2**32 (Flower's largest modulus_range): each site's quantised
  value is at most 2**22, so one aggregation holds at most 2**32 / 2**22 - 1 = 1023 sites before
  the sum wraps around (MAX_SITES_PER_AGGREGATION): a scenario with more is refused, and a round
  that selects more fails before any update is sent.

Shares (`secagg_num_shares` k, `secagg_reconstruction_threshold` f, RunSettings): each site splits
its two SecAgg+ secrets (its mask seed and its pairwise-mask key) into Shamir shares for its
*neighbourhood*: every selected site while the round has at most k sites (Flower's num_shares =
1.0), otherwise k sites including itself (Flower's integer num_shares), the neighbourhoods drawn by
the coordinator's shuffle of the sites each round. round(f * shares) of them (at least 2) unmask a
site, and a neighbourhood survives shares - threshold dropouts. With the defaults (k = 31,
f = 0.67): up to 31 sites nothing changes from sharing with every site (3 sites: 2 unmask, one may
drop out mid-round); beyond 31, each neighbourhood is 31 sites, 21 of which unmask and 10 of which
may drop out. The cost is Shamir splitting (at each site) and combining (at the coordinator) in
pure Python, ~shares x threshold field operations per secret per site: with every site sharing
with every other it grows with the cube of the consortium (100 sites: ~1.5 CPU-s per site and
round, a round took ~5 minutes on 2 cores), with a fixed k only linearly (k = 31: ~0.1 CPU-s).
What k < sites gives up (README "Scale"): a coordinator that colludes with `threshold` of a site's
k - 1 neighbours learns that site's individual update, instead of needing two thirds of the whole
consortium.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from spine_fl.server.preflight import PREFLIGHT_TIMEOUT, PreflightRequest
from spine_fl.shared import protocol
from spine_fl.shared.config import SECAGG_MAX_SITES, SECAGG_MODULUS_RANGE, SECAGG_QUANTIZATION_RANGE, RunSettings

QUANTIZATION_RANGE = SECAGG_QUANTIZATION_RANGE
MODULUS_RANGE = SECAGG_MODULUS_RANGE  # Flower's default and its largest allowed
MAX_SITES_PER_AGGREGATION = SECAGG_MAX_SITES  # 1023: with more, the masked sum can wrap around
RECONSTRUCTION_FRACTION = RunSettings.secagg_reconstruction_threshold  # the default fraction (0.67)
logger = logging.getLogger("spine_fl.server")


def neighbourhood(sites: int, num_shares: int, fraction: float) -> tuple[int, int]:
    """(shares per site, shares needed to unmask a site) in a round of `sites` sites, as Flower
    computes them from what SpineSecAggPlus hands it (secaggplus_workflow.setup_stage)."""
    if sites <= num_shares:  # num_shares = 1.0: every selected site
        shares = sites
    else:
        shares = num_shares + (1 - num_shares % 2)  # Flower makes an even count odd
    return shares, max(round(fraction * shares), 2)


class SpineSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow with the share count decided per round from the sites selected:
    all of them up to `max_shares` sites, `max_shares` neighbours beyond (module docstring).

    Flower takes num_shares as a fraction of the selected sites (a float) or as a count (an int
    that must be below the number of sites, or the threshold exceeds the neighbourhood and the
    round fails); only after the strategy has selected this round's sites (in setup_stage) is it
    known which applies.

    The round's pre-flight (server/preflight.py) rides on the setup messages: sites that are not
    ready answer without keys and are left out. Flower has then fixed the shares and the threshold
    for all the sites selected, so a round in which any site was left out by the pre-flight is set
    up again among the ready sites (one more exchange, only then); a site merely silent at the setup
    stage is left out of the round without it (_leave_out_absent)."""

    def __init__(self, max_shares: int, reconstruction_fraction: float, **kwargs: Any) -> None:
        super().__init__(num_shares=1.0, reconstruction_threshold=reconstruction_fraction, **kwargs)
        self.max_shares = max_shares
        self.reconstruction_fraction = reconstruction_fraction
        self.last_round: dict[str, int] = {}  # sites, shares and threshold of the latest setup stage

    def shares_for(self, sites: int) -> tuple[int, int]:
        """(shares per site, threshold) in a round of `sites` sites."""
        return neighbourhood(sites, self.max_shares, self.reconstruction_fraction)

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        strategy = context.strategy
        asked: list[PreflightRequest] = []  # the round's pre-flight, when the strategy has one

        def decide(selected: int) -> None:
            self.num_shares = 1.0 if selected <= self.max_shares else self.max_shares

        def select(server_round: int, parameters: Any, client_manager: Any) -> Any:
            if hasattr(strategy, "select_for_setup"):  # the run's RecordingStrategy (not the recalibration's)
                instructions, request = strategy.select_for_setup(server_round, parameters, client_manager)
                asked.extend([request] if request is not None else [])
            else:
                instructions = strategy.configure_fit(server_round, parameters, client_manager)
            decide(len(instructions or []))
            return instructions

        context.strategy = _Selection(strategy, select)  # type: ignore[assignment]
        try:
            ready = super().setup_stage(_PreflightOnSetup(grid, asked), context, state)
            if not state.nid_to_neighbours:  # no setup message went out
                return ready
            if asked:
                request = asked[0]
                if not request.enough(len(state.active_node_ids)):
                    return False  # the run stops here, before anyone trains
                if state.active_node_ids != set(state.sampled_node_ids):
                    # Flower fixed the shares and the threshold for every site selected, and the sites
                    # made their shares with them: set the round up again among the ready sites only
                    chosen = [(p, i) for p, i in request.instructions if p.node_id in state.active_node_ids]
                    context.strategy = _Selection(strategy, lambda *_: (decide(len(chosen)), chosen)[1])
                    ready = super().setup_stage(grid, context, state)
            _leave_out_absent(state)  # silent at the setup stage: never handed out a share
            ready = len(state.active_node_ids) >= 2 and self._check_threshold(state)
            if ready and len(state.sampled_node_ids) > MAX_SITES_PER_AGGREGATION:
                logger.error("spine-fl: %d sites selected, more than the %d one SecAgg+ sum can hold; the round "
                             "stops before any update is sent", len(state.sampled_node_ids), MAX_SITES_PER_AGGREGATION)
                return False
            return ready
        finally:
            context.strategy = strategy
            self.num_shares = 1.0
            chosen_round = {"sites": len(state.sampled_node_ids), "num_shares": state.num_shares,
                            "threshold": state.threshold}
            if chosen_round["sites"] and chosen_round != self.last_round:
                logger.info("spine-fl: SecAgg+ over %d sites: each site's secrets in %d shares (%s), %d of them "
                            "unmask it", chosen_round["sites"], chosen_round["num_shares"],
                            "one per site" if chosen_round["num_shares"] >= chosen_round["sites"]
                            else "its neighbourhood", chosen_round["threshold"])
            self.last_round = chosen_round


def _leave_out_absent(state: WorkflowState) -> None:
    """After the setup stage: the round goes on among the sites that sent their public keys, as if
    only they had been selected. A site left out there (refused, not ready, silent) never received
    anyone's key nor handed out a share, so nobody holds a mask with it; left in Flower's sampled
    set, the unmask stage would look for its shares and fail the whole round."""
    active = set(state.active_node_ids)
    state.sampled_node_ids = set(active)
    state.nid_to_neighbours = {nid: peers & active for nid, peers in state.nid_to_neighbours.items() if nid in active}
    state.nid_to_fitins = {nid: ins for nid, ins in state.nid_to_fitins.items() if nid in active}
    state.nid_to_proxies = {nid: proxy for nid, proxy in state.nid_to_proxies.items() if nid in active}


class _PreflightOnSetup:
    """The Grid of one setup stage: each setup message also carries the round's pre-flight question
    (server/preflight.py), which the strategy prepared while selecting the sites; a reply that is not
    a ready answer proving the site's pinned key comes back as an error, so the site is left out of
    the round before anyone trains. One exchange per round fewer than asking first."""

    def __init__(self, grid: Grid, asked: list[PreflightRequest]) -> None:
        self._grid, self._asked = grid, asked

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if not self._asked:
            return self._grid.send_and_receive(messages, timeout=timeout)
        request = self._asked[0]
        sent = {}
        for message in messages:
            node = message.metadata.dst_node_id
            message.content = RecordDict({**message.content, protocol.PREFLIGHT: request.record_for(node)})
            sent[node] = message
        judged = []
        for reply in self._grid.send_and_receive(list(sent.values()),
                                                 timeout=PREFLIGHT_TIMEOUT if timeout is None else timeout):
            asked = sent.get(reply.metadata.src_node_id)
            if reply.has_error() or (request.ready(reply) and protocol.SECAGG_CONFIGS in reply.content.config_records):
                judged.append(reply)
            elif asked is not None:  # not ready, or the key not proven (recorded by request.ready): left out
                judged.append(Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION,
                                            reason="left out by the coordinator's pre-flight"), reply_to=asked))
        return judged


class _Selection:
    """The run's strategy with configure_fit replaced by `select`; every other attribute is the
    strategy's own (only configure_fit is called during Flower's setup stage)."""

    def __init__(self, inner: Any, select: Callable[[int, Any, Any], Any]) -> None:
        self._inner, self._select = inner, select

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self._select(server_round, parameters, client_manager)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def secagg_fit_workflow(run: RunSettings) -> SpineSecAggPlus | None:
    """None means Flower's plain fit workflow: only when the run explicitly sets secagg = false."""
    if not run.secagg:
        return None
    return SpineSecAggPlus(
        run.secagg_num_shares,
        run.secagg_reconstruction_threshold,
        max_weight=run.secagg_max_weight,
        clipping_range=run.secagg_clipping_range,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
    )


def quantization_error_bound(run: RunSettings, min_site_examples: int) -> float:
    """Largest per-weight deviation of the SecAgg+ aggregate from plain FedAvg: one quantisation level
    scaled by the smallest site's share of max_weight (module docstring)."""
    return 2 * run.secagg_clipping_range / QUANTIZATION_RANGE * run.secagg_max_weight / max(min_site_examples, 1)
