"""The ClientApp: trains the shared model with DP-SGD on this site's training split and evaluates
it on the site's held-out split. Only weights, example counts and numeric metrics leave the site,
each reply recorded in the site's egress ledger first (see mods.py for the order of concerns).
Nothing computed on the training patients leaves besides the (masked) weights and the privacy
report; held-out metrics leave only when the site's policy allows (evaluation_budget.py)."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import Scalar

from spine_fl.client.calibration import CalibrationWithheld, withheld_reply
from spine_fl.client.calibration import release as calibration_release
from spine_fl.client.privacy.charged_rounds import ChargedReply, keep_reply, model_sha256, replay
from spine_fl.client.privacy.evaluation_budget import withhold_reason
from spine_fl.client.privacy.mods import site_mods
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, SpendRecord
from spine_fl.client.privacy.received_models import save_received
from spine_fl.client.privacy.round_privacy import assess_round, take
from spine_fl.client.privacy.signed_log import site_key_fingerprint
from spine_fl.client.site_config import Site
from spine_fl.client.site_data import resolve_site, site_data
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings, run_key_of
from spine_fl.shared.metrics import binary_metrics
from spine_fl.shared.models.registry import build_model, pick_device
from spine_fl.shared.training.local import DpSettings, TrainSettings, get_weights, predict, set_weights, train

log = logging.getLogger("spine_fl.client")


class SiteClient(NumPyClient):
    def __init__(self, site: Site, context: Context):
        self.site = site
        self.context = context
        self.run_id = str(context.run_id)
        self.device = pick_device()

    def _prepare(self, parameters: list[np.ndarray], config: dict[str, Scalar]):
        settings = RunSettings.from_run_config(config)
        model = build_model(settings.task_spec, settings.seed)  # the definition the run carries
        set_weights(model, parameters)
        return settings, model, site_data(self.site, settings.task, settings.image_size)

    def _site_index(self, config: dict[str, Scalar]) -> int:
        sites = str(config.get(protocol.SITES, "")).split(",")
        return sites.index(self.site.name) if self.site.name in sites else -1

    def fit(self, parameters, config):
        if int(config.get(protocol.CALIBRATION, 0)):
            return self._calibrate(parameters, config)
        settings, model, data = self._prepare(parameters, config)
        train_split = data.subset("train")
        server_round = int(config.get(protocol.ROUND, 0))
        local = TrainSettings(
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            optimizer=settings.optimizer,
            proximal_mu=float(config.get(protocol.PROXIMAL_MU, settings.proximal_mu)),
            seed=settings.seed * 100_003 + server_round,
        )
        metrics: dict[str, Scalar] = {protocol.SITE_INDEX: self._site_index(config), protocol.DP: int(settings.dp),
                                      protocol.LEDGER_KEY: site_key_fingerprint(self.site.state_dir)}
        if settings.dp:
            run_key = run_key_of(config, self.run_id)  # the same run across coordinator restarts
            # assessed by the site-policy mod before this round; assessed here only without that mod
            assessed = (take(self.context, run_key, server_round)
                        or assess_round(self.site, settings, run_key, server_round, len(train_split)))
            if assessed.replay:  # a restarted coordinator asks again: re-send what was charged, or refuse
                kept = replay(self.site.state_dir, run_key, server_round, parameters)
                log.warning("spine-fl: %s round %s was already charged; re-sending the reply kept for it",
                            self.site.name, server_round)
                return kept.weights, kept.num_examples, kept.metrics | {protocol.SITE_INDEX: metrics[protocol.SITE_INDEX]}
            plan = assessed.plan
            loss, spend = train(model, train_split, local, self.device,
                                DpSettings(plan.noise_multiplier, plan.max_grad_norm))
            if spend != plan.round_spend:  # the figures assessed would not be what was spent
                raise RuntimeError(f"DP-SGD spent {spend}, not the planned {plan.round_spend}; nothing is sent")
            weights = get_weights(model)
            _check_secagg_range(weights, settings)  # before the charge: nothing leaves when this fails
            ledger = PrivacyLedger(self.site.state_dir, assessed.dataset)
            ledger.append(SpendRecord(run_key, server_round, spend.noise_multiplier, spend.sample_rate, spend.steps,
                                      plan.max_grad_norm, plan.delta, settings.accountant))
            lines, head_sha = ledger.log.last()
            metrics.update({
                protocol.EPSILON_RUN: assessed.epsilon_run_after,
                protocol.EPSILON_LIFETIME: assessed.epsilon_lifetime_after,
                protocol.DELTA: plan.delta, protocol.NOISE_MULTIPLIER: spend.noise_multiplier,
                protocol.MAX_GRAD_NORM: plan.max_grad_norm, protocol.SAMPLE_RATE: spend.sample_rate,
                protocol.STEPS_RUN: assessed.steps_run_after,
                protocol.LEDGER_DATASET: assessed.dataset, protocol.LEDGER_LINES: lines,
                protocol.LEDGER_SHA256: head_sha,
            })
            keep_reply(self.site.state_dir, run_key, ChargedReply(server_round, model_sha256(parameters), weights,
                                                                  len(train_split), metrics))
        else:
            loss, _ = train(model, train_split, local, self.device)
            weights = get_weights(model)
            _check_secagg_range(weights, settings)
        log.debug("%s round %s: training loss %.4f (kept at the site)", self.site.name, server_round, loss)
        return weights, len(train_split), metrics

    def _calibrate(self, parameters, config):
        """A recalibration round: a DP histogram of the final model's logits, instead of weights."""
        settings, model, data = self._prepare(parameters, config)
        server_round = int(config.get(protocol.ROUND, 0))
        run_key = run_key_of(config, self.run_id)
        take(self.context, run_key, server_round)  # the policy mod's training assessment: not what is spent here
        save_received(self.site.state_dir, self.run_id, parameters, config)  # for the site's privacy audit
        stage = int(config.get(protocol.CALIBRATION, 0))
        window = None
        if stage == protocol.CALIBRATION_FIT:
            window = (float(config.get(protocol.CALIBRATION_WINDOW_LO, 0.0)),
                      float(config.get(protocol.CALIBRATION_WINDOW_HI, 0.0)))
        metrics: dict[str, Scalar] = {protocol.SITE_INDEX: self._site_index(config),
                                      protocol.LEDGER_KEY: site_key_fingerprint(self.site.state_dir)}
        try:
            out = calibration_release(self.site, settings, model, data, run_key, server_round, self.device, stage,
                                      window)
        except CalibrationWithheld as exc:  # the site's own rules: a clean refusal, counted by the coordinator
            log.warning("spine-fl: %s round %s: recalibration histogram withheld: %s", self.site.name, server_round,
                        exc.reason)
            return [withheld_reply(stage)], 0, metrics  # 0 examples: zeros in place of a histogram, not counted
        return [out.histogram], 1, metrics | out.metrics  # 1 example each: the mean x contributors is the sum

    def evaluate(self, parameters, config):
        _, model, data = self._prepare(parameters, config)
        save_received(self.site.state_dir, self.run_id, parameters, config)  # for the site's privacy audit
        held_out = data.subset("test")
        site_index = self._site_index(config)
        server_round = int(config.get(protocol.ROUND, 0))
        withheld = withhold_reason(self.site, held_out.y, run_key_of(config, self.run_id), server_round)
        if withheld is not None:  # decided before anything is computed on the held-out patients
            log.warning("spine-fl: %s round %s: held-out metrics withheld: %s", self.site.name, server_round, withheld)
            return 0.0, 0, {protocol.SITE_INDEX: site_index, protocol.WITHHELD: 1}
        metrics = binary_metrics(held_out.y, predict(model, held_out, self.device))
        metrics.pop("n")
        return metrics["log_loss"], len(held_out), {**metrics, protocol.SITE_INDEX: site_index}


def _check_secagg_range(weights: list[np.ndarray], settings: RunSettings) -> None:
    """SecAgg+ clips every weight to +-clipping_range: refuse to send what it would distort."""
    if not settings.secagg:
        return
    largest = max(float(np.abs(w).max()) for w in weights if w.size)
    if largest > settings.secagg_clipping_range:
        raise ValueError(f"a model weight of magnitude {largest:.2f} exceeds secagg_clipping_range "
                         f"{settings.secagg_clipping_range:g}; raise the range in the run config")


def build_client_app(sites: Sequence[Site] | None = None, outer_mods: Sequence[Mod] = ()) -> ClientApp:
    """In simulation, `sites` maps partition ids to sites; in deployment the node config names the site.
    `outer_mods` wrap everything (e.g. a test's recorder of what leaves the site)."""

    def client_fn(context: Context):
        return SiteClient(resolve_site(context, sites), context).to_client()

    return ClientApp(client_fn=client_fn, mods=[*outer_mods, *site_mods(sites)])


app = build_client_app()
