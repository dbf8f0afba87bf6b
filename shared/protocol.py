"""The wire contract between the ServerApp (coordinator) and the ClientApp (site).

Everything that crosses the wire is named here once; both sides import these names, so a key
cannot drift between the sender and the reader. spine-fl uses Flower's legacy fit/evaluate layout
(Flower's SecAgg+ works only on it), so each message is a RecordDict with these records:

Round instruction, coordinator -> site (config record FIT_CONFIG or EVALUATE_CONFIG):
    every RunSettings field under its dashed name (`RunSettings.to_run_config`: "noise-multiplier",
    "task", ...), plus
    ROUND        the round, counted across coordinator restarts;
    SITES        the run's site names, comma-separated; a site reports its position as SITE_INDEX;
    RUN_KEY      the coordinator's 32-hex-digit name for the run (a request the site checks, never
                 a path); the per-run privacy budget is kept under it;
    PROXIMAL_MU  added by Flower's FedProx to train instructions.
    A SecAgg+ round also carries Flower's SECAGG_CONFIGS record (key exchange, masked update).

Train reply, site -> coordinator (metric record FIT_METRICS; example count in FIT_NUM_EXAMPLES):
    SITE_INDEX, DP (0/1), and with DP-SGD the privacy report PRIVACY_METRICS: the epsilon this
    run and over the site's lifetime, the DELTA they are at (the site's own: at most 1 / (10 n)
    for its n training patients, or the run's when the run asks for a smaller one), and the
    DP-SGD settings used. The weights travel in Flower's parameters record (SecAgg+-masked on
    SecAgg+ rounds). Every train reply carries LEDGER_KEY (the fingerprint of the key that signs
    the site's ledgers: the coordinator pins it), and a DP one the privacy ledger's head after the
    round (LEDGER_DATASET, LEDGER_LINES, LEDGER_SHA256): the coordinator keeps the last one. No
    loss on the training patients: it would leave in the clear even under SecAgg+, so it is not sent ("train_loss" is undeclared: the audit's egress scan flags it).

Evaluate reply, site -> coordinator (metric record EVALUATE_METRICS, loss = log loss):
    EVALUATION_METRICS on the site's held-out split, and SITE_INDEX. A site whose held-out split
    is too small (policy min_eval_patients / min_eval_per_class) or whose evaluation budget for
    the dataset is spent (policy max_evaluations) sends only SITE_INDEX and WITHHELD = 1, with
    loss 0.0 and 0 examples: no figure computed on its held-out patients leaves.
    EVALUATE_REPLY_METRICS lists every key an evaluate reply may carry.

Pre-flight, coordinator -> site, before every round's training (message type "query", config
    record PREFLIGHT): the round's train instruction as above plus LEDGER_HEADS, JSON of
    {site: {LEDGER_DATASET, LEDGER_LINES, LEDGER_SHA256}} as the coordinator last recorded them (a
    site reads its own; the others' hash and line count say nothing about anyone's data). The site
    answers with the same checks it makes before training — policy, delta, budget, its ledger
    intact and holding the coordinator's head — either a refusal or the config record
    PREFLIGHT_REPLY: SITE, READY = 1, LEDGER_KEY and, with DP, its current privacy-ledger head.
    Only sites that answered ready, with the pinned key, are sent the round: nobody trains (or
    spends epsilon) in a round that cannot reach min_sites. The request also carries
    PREFLIGHT_NONCE (32 hex digits, fresh per request) and the reply proves the key: it carries
    LEDGER_PUBLIC_KEY and an Ed25519 signature by that key (PREFLIGHT_SIGNATURE_R and _S, its two
    32-byte halves in hex) over the canonical JSON (sorted keys, no spaces) of PREFLIGHT_CONTEXT
    under "context", RUN_KEY, ROUND and PREFLIGHT_NONCE of the request, and the reply's
    PREFLIGHT_SIGNED fields (None where absent).
    In a SecAgg+ round the PREFLIGHT record rides on the setup stage's message (type "train", with
    SECAGG_CONFIGS) instead of a message of its own: a ready site answers with its public keys and
    PREFLIGHT_REPLY beside them, a site that is not ready with the refusal alone (no keys), and the
    coordinator goes on with the ready sites only — still before anyone trains.

Refusal, site -> coordinator: an Error reply with code REFUSAL_CODE whose reason is
    REFUSAL_PREFIX + JSON of `shared.refusal.Refusal` (rule, message, epsilon figures).

Egress-ledger kinds: the Flower message type of the reply, with "/secagg+<stage>" for SecAgg+
stages (`message_kind`).

Recalibration, after the last training round: two train instructions through SecAgg+ like every
train round unless the run sets secagg = false, whose parameters are the final model. First
CALIBRATION = CALIBRATION_LOCATE (ROUND = the last training round + 1): the site replies with one
array instead of weights, a DP histogram of the final model's logits on its calibration patients
without labels (shape CALIBRATION_LOCATE_SHAPE). Then CALIBRATION = CALIBRATION_FIT (ROUND + 1) with
the window CALIBRATION_WINDOW_LO/HI the coordinator chose from the first sum: a DP histogram over
that window split by outcome (shape CALIBRATION_HISTOGRAM_SHAPE). Both are divided by
shared/training/calibration.py HISTOGRAM_SCALE and weigh 1 example (every site weighs the same: the
coordinator's mean times the number of sites is the sum); the train metrics are SITE_INDEX, DP,
LEDGER_KEY, the privacy report after the release and CALIBRATION_NOISE (the noise std per count).

Deployment run config (`flwr run` / `spine-fl server`): RUN_CONFIG_SITES and RUN_CONFIG_OUT_DIR
besides the run settings.
"""

from __future__ import annotations

from typing import Final

# Legacy record names (Flower's recorddict_compat layout).
FIT_CONFIG: Final = "fitins.config"
EVALUATE_CONFIG: Final = "evaluateins.config"
FIT_METRICS: Final = "fitres.metrics"
FIT_NUM_EXAMPLES: Final = "fitres.num_examples/num_examples"
EVALUATE_METRICS: Final = "evaluateres.metrics"
EVALUATE_NUM_EXAMPLES: Final = "evaluateres.num_examples/num_examples"
SECAGG_CONFIGS: Final = "secaggplus_configs"
INSTRUCTION_RECORDS: Final = (FIT_CONFIG, EVALUATE_CONFIG)

# Round instruction keys beside the run settings.
ROUND: Final = "round"
SITES: Final = "sites"
RUN_KEY: Final = "run_key"
PROXIMAL_MU: Final = "proximal_mu"

# Train reply metrics.
SITE_INDEX: Final = "site_index"
DP: Final = "dp"
EPSILON_RUN: Final = "epsilon_run"
EPSILON_LIFETIME: Final = "epsilon_lifetime"
DELTA: Final = "delta"
NOISE_MULTIPLIER: Final = "noise_multiplier"
MAX_GRAD_NORM: Final = "max_grad_norm"
SAMPLE_RATE: Final = "sample_rate"
STEPS_RUN: Final = "steps_run"
PRIVACY_METRICS: Final = (EPSILON_RUN, EPSILON_LIFETIME, DELTA, NOISE_MULTIPLIER, MAX_GRAD_NORM, SAMPLE_RATE,
                          STEPS_RUN)
# Ledger evidence: hex text, the only text a reply carries.
LEDGER_KEY: Final = "ledger_key"  # "sha256:<hex>" of the site's raw Ed25519 ledger-signing public key
LEDGER_DATASET: Final = "ledger_dataset"  # the privacy ledger's dataset id (32 hex digits)
LEDGER_LINES: Final = "ledger_lines"  # its number of lines
LEDGER_SHA256: Final = "ledger_sha256"  # SHA-256 of its last line (64 hex digits)
LEDGER_HEAD: Final = (LEDGER_DATASET, LEDGER_LINES, LEDGER_SHA256)
LEDGER_PUBLIC_KEY: Final = "ledger_public_key"  # pre-flight reply: the raw Ed25519 public key (64 hex digits)
PREFLIGHT_SIGNATURE_R: Final = "preflight_signature_r"  # pre-flight reply: the signature's R half (64 hex digits)
PREFLIGHT_SIGNATURE_S: Final = "preflight_signature_s"  # pre-flight reply: the signature's S half (64 hex digits)
LEDGER_TEXT: Final = (LEDGER_KEY, LEDGER_DATASET, LEDGER_SHA256, LEDGER_PUBLIC_KEY, PREFLIGHT_SIGNATURE_R,
                      PREFLIGHT_SIGNATURE_S)
CALIBRATION_NOISE: Final = "calibration_noise_std"  # recalibration reply: Gaussian noise std per count
TRAIN_METRICS: Final = (SITE_INDEX, DP, *PRIVACY_METRICS, *LEDGER_HEAD, LEDGER_KEY, CALIBRATION_NOISE)
CALIBRATION: Final = "calibration"  # instruction: CALIBRATION_LOCATE or CALIBRATION_FIT (module docstring)
CALIBRATION_LOCATE: Final = 1
CALIBRATION_FIT: Final = 2
CALIBRATION_WINDOW_LO: Final = "calibration_window_lo"  # the fit stage's window of logits (floats)
CALIBRATION_WINDOW_HI: Final = "calibration_window_hi"
CALIBRATION_LOCATE_BINS: Final = 12
CALIBRATION_BINS: Final = 24
CALIBRATION_LOCATE_SHAPE: Final = (1, CALIBRATION_LOCATE_BINS)  # unlabelled counts on a coarse grid
CALIBRATION_HISTOGRAM_SHAPE: Final = (2, CALIBRATION_BINS + 2)  # rows: without / with the outcome; 2 overflow bins
CALIBRATION_SHAPES: Final = (CALIBRATION_LOCATE_SHAPE, CALIBRATION_HISTOGRAM_SHAPE)

# Pre-flight.
PREFLIGHT: Final = "spine-fl.preflight"
PREFLIGHT_REPLY: Final = "spine-fl.preflight-reply"
LEDGER_HEADS: Final = "ledger_heads"
SITE: Final = "site"
READY: Final = "ready"
PREFLIGHT_NONCE: Final = "preflight_nonce"  # request: 32 hex digits, fresh per request
PREFLIGHT_CONTEXT: Final = "spine-fl pre-flight v1"  # signed under "context": no ledger line or head has that key
PREFLIGHT_SIGNED: Final = (SITE, READY, LEDGER_KEY, LEDGER_PUBLIC_KEY, LEDGER_DATASET, LEDGER_LINES, LEDGER_SHA256)

# Evaluate reply metrics (shared.metrics.binary_metrics without its count), averaged per round by
# the coordinator, example-weighted.
EVALUATION_METRICS: Final = ("auroc", "accuracy", "sensitivity", "specificity", "f1", "brier", "log_loss",
                             "prevalence")
ROUND_METRICS: Final = ("auroc", "accuracy", "sensitivity", "specificity", "f1", "brier", "log_loss")
# Set to 1 (with SITE_INDEX, loss 0.0, 0 examples and nothing else) when the site withholds its
# held-out metrics: too few held-out patients, or its evaluation budget spent.
WITHHELD: Final = "withheld"
EVALUATE_REPLY_METRICS: Final = (*EVALUATION_METRICS, SITE_INDEX, WITHHELD)

# Refusals.
REFUSAL_CODE: Final = 4403
REFUSAL_PREFIX: Final = "spine-fl-refusal "

# Deployment run config.
RUN_CONFIG_SITES: Final = "sites"
RUN_CONFIG_OUT_DIR: Final = "out-dir"


def fit_metric(name: str) -> str:
    """A train-reply metric as the egress ledger names it ("fitres.metrics/<name>")."""
    return f"{FIT_METRICS}/{name}"


def evaluate_metric(name: str) -> str:
    """An evaluate-reply metric as the egress ledger names it ("evaluateres.metrics/<name>")."""
    return f"{EVALUATE_METRICS}/{name}"
