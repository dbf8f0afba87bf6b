"""Where a spine-fl round's seconds go: cProfile at the sites (in Flower's worker processes) and at the coordinator.

Sites: an outer client mod profiles every message a virtual site handles and dumps one file per
message, named by round; rounds 2.. are summed (round 1 holds start-up: imports, decoding the
images). Coordinator: the ServerApp's main is profiled in its own thread and the profile is cut at
every round boundary (`ServerProfiler.cut`, called from the round hook).

The summary gives, per round: the sites' total, named components (inclusive times, so nested
ones overlap: training includes make_private), self time by library, and the top functions.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

# (path ending, function name) -> what it is; a name not found in a profile is left out.
COMPONENTS: dict[tuple[str, str], str] = {
    ("shared/training/local.py", "train"): "local training (DP-SGD through Opacus when DP is on)",
    ("opacus/privacy_engine.py", "make_private"): "  of which Opacus make_private",
    ("client/app.py", "evaluate"): "held-out evaluation (evaluate)",
    ("client/privacy/preflight.py", "answer_preflight"): "pre-flight answers",
    ("client/privacy/round_checks.py", "decide_round"): "site policy and budget check (decide_round)",
    ("client/privacy/round_privacy.py", "assess_round"): "round privacy assessment (assess_round)",
    ("client/privacy/privacy_ledger.py", "dataset_id"):
        "dataset fingerprint: every manifest image stat'ed, hashes cached (dataset_id)",
    ("shared/training/accounting.py", "epsilon"): "epsilon from a history (accounting.epsilon)",
    ("shared/training/accounting.py", "compose"): "RDP composition (accounting.compose)",
    ("opacus/accountants/analysis/rdp.py", "compute_rdp"): "Opacus compute_rdp",
    ("opacus/accountants/analysis/rdp.py", "get_privacy_spent"): "RDP-to-epsilon conversions",
    ("client/privacy/mods.py", "record_egress"): "egress ledger entry (record_egress)",
    ("client/privacy/privacy_ledger.py", "append"): "privacy ledger append",
    ("client/privacy/charged_rounds.py", "keep_reply"): "charged reply kept (keep_reply)",
    ("client/privacy/received_models.py", "save_received"): "received model saved (save_received)",
    ("shared/models/registry.py", "build_model"): "model built from the task",
    ("flwr/client/mod/secure_aggregation/secaggplus_mod.py", "secaggplus_mod"):
        "Flower secaggplus_mod (wraps the training stage: includes training)",
    ("server/preflight.py", "preflight"): "coordinator pre-flight (incl. waiting for the sites' answers)",
    ("flwr/server/workflow/secure_aggregation/secaggplus_workflow.py", "__call__"):
        "Flower SecAggPlusWorkflow (incl. waiting for the sites)",
}

# self time by where the code lives
LIBRARIES = (("torch", "/torch/"), ("opacus", "/opacus/"), ("flwr", "/flwr/"), ("ray", "/ray/"),
             ("cryptography", "/cryptography/"), ("numpy", "/numpy/"), ("scipy", "/scipy/"),
             ("dp_accounting", "/dp_accounting/"), ("grpc/protobuf", "/grpc/"), ("grpc/protobuf", "/protobuf/"),
             ("spine-fl client", "/client/"), ("spine-fl shared", "/shared/"), ("spine-fl server", "/server/"),
             ("python stdlib", "/lib/python3"), ("python stdlib", "<frozen"))
# C functions (cProfile's "~" path) by their name
BUILTINS = (("torch", "torch"), ("file system calls", "posix."), ("sleeping / waiting", "sleep"),
            ("sleeping / waiting", "acquire"), ("hashing", "_hashlib"), ("hashing", "sha"), ("numpy", "numpy"))
# whose callees are listed: what a site's round is made of, one level down
EXPANDED = {("client/app.py", "fit"): "fit", ("client/app.py", "evaluate"): "evaluate",
            ("client/privacy/round_checks.py", "decide_round"): "decide_round",
            ("client/privacy/preflight.py", "answer_preflight"): "answer_preflight"}


def profiling_mod(folder: Path) -> Mod:
    """A client mod that profiles everything inside it, one .prof file per message."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        profile = cProfile.Profile()
        profile.enable()
        try:
            return call_next(msg, ctxt)
        finally:
            profile.disable()
            kind = msg.metadata.message_type.replace(".", "-")
            name = f"site-r{msg.metadata.group_id}-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}.prof"
            profile.dump_stats(folder / name)

    return mod


class ServerProfiler:
    """Profiles the ServerApp's main; `cut(round)` ends that round's profile and starts the next."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.profile: cProfile.Profile | None = None

    def cut(self, server_round: int) -> None:
        if self.profile is not None:
            self.profile.disable()
            self.profile.dump_stats(self.folder / f"server-r{server_round}.prof")
            self.profile = cProfile.Profile()
            self.profile.enable()

    @contextmanager
    def patched(self) -> Iterator[None]:
        """While active, the simulation runner's ServerApp is wrapped by this profiler."""
        import spine_fl.simulations.runner as runner

        original = runner.build_server_app

        def build(*args: Any, **kwargs: Any) -> Any:
            app = original(*args, **kwargs)
            inner: Callable[..., None] = app._main  # noqa: SLF001 - the function @app.main() registered

            def main(grid: Any, context: Any) -> None:
                self.profile = cProfile.Profile()
                self.profile.enable()
                try:
                    inner(grid, context)
                finally:
                    self.profile.disable()
                    self.profile = None

            app._main = main  # noqa: SLF001
            return app

        runner.build_server_app = build
        try:
            yield
        finally:
            runner.build_server_app = original


def _round_of(path: Path) -> int:
    tag = path.name.split("-")[1]  # site-r<round>-... / server-r<round>.prof
    tag = tag.removesuffix(".prof")
    return int(tag[1:]) if tag[1:].isdigit() else -1


def load(folder: Path, prefix: str, rounds: range) -> pstats.Stats | None:
    files = [str(p) for p in sorted(folder.glob(f"{prefix}-r*.prof")) if _round_of(p) in rounds]
    return pstats.Stats(*files) if files else None


def _library(path: str, func: str) -> str:
    if path == "~":
        return next((name for name, marker in BUILTINS if marker in func), "other built-ins")
    for name, marker in LIBRARIES:
        if marker in path:
            return name
    return "other"


def summarize(stats: pstats.Stats, rounds: int, top: int = 12) -> dict[str, Any]:
    """Seconds per round: total, named components, self time by library, top functions."""
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    per = 1.0 / max(rounds, 1)
    components: dict[str, float] = {}
    for (path, _, name), (_, _, _, cum, _) in table.items():
        for (ending, func), label in COMPONENTS.items():
            if name == func and path.endswith(ending):
                components[label] = round(components.get(label, 0.0) + cum * per, 3)
    libraries: dict[str, float] = {}
    for (path, _, func), (_, _, tt, _, _) in table.items():
        libraries[_library(path, func)] = libraries.get(_library(path, func), 0.0) + tt * per
    repo = str(Path(__file__).resolve().parents[2])

    def label(key: tuple[str, int, str]) -> str:
        path, line, name = key
        return f"{path.removeprefix(repo + '/')}:{line}({name})"

    stats.calc_callees()
    callees: dict[str, dict[str, float]] = {}
    for key in table:
        for (ending, func), name in EXPANDED.items():
            if key[2] == func and key[0].endswith(ending):
                below = stats.all_callees.get(key, {})  # type: ignore[attr-defined]
                ranked = sorted(below.items(), key=lambda kv: -kv[1][3])[:top // 2]
                callees[name] = {label(k): round(v[3] * per, 3) for k, v in ranked}

    own = [(k, v[3]) for k, v in table.items() if k[0].startswith(repo) and "site-packages" not in k[0]]
    by_cum = sorted(own, key=lambda kv: -kv[1])
    by_self = sorted(((k, v[2]) for k, v in table.items()), key=lambda kv: -kv[1])
    return {
        "total_seconds_per_round": round(stats.total_tt * per, 3),  # type: ignore[attr-defined]
        "components_seconds_per_round": dict(sorted(components.items(), key=lambda kv: -kv[1])),
        "self_seconds_per_round_by_library": {k: round(v, 3)
                                              for k, v in sorted(libraries.items(), key=lambda kv: -kv[1])},
        "callees_seconds_per_round": callees,
        "top_spine_fl_cumulative": {label(k): round(v * per, 3) for k, v in by_cum[:top]},
        "top_self": {label(k): round(v * per, 3) for k, v in by_self[:top]},
    }
