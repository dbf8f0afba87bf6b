"""The yardstick on Flower: a minimal ServerApp and ClientApp as Flower's own examples write them.

FedAvg in Flower's DefaultWorkflow; with SecAgg+, Flower's `SecAggPlusWorkflow` as the fit workflow
and `secaggplus_mod` on the ClientApp. The ClientApp trains with plain_training (PyTorch, and
Opacus for DP): no spine-fl code runs, only its model definition and the sites' saved arrays.
The ServerApp runs in this process (a thread of Flower's simulation engine): after each round's
evaluation it calls `on_round(round)`, where the benchmark takes the time and may run other work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from spine_fl.simulations.benchmarks import plain_training
from spine_fl.simulations.benchmarks.plain_training import Recipe


@dataclass(frozen=True)
class SecAggParams:
    """SecAggPlusWorkflow's parameters (the benchmark passes spine-fl's, so both do the same work)."""

    num_shares: float | int
    reconstruction_threshold: float | int
    max_weight: float
    clipping_range: float
    quantization_range: int


def client_app(template: nn.Module, sites: list[Path], recipe: Recipe, secagg: bool) -> Any:
    import torch
    from flwr.app import Context
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    class PlainClient(NumPyClient):
        def __init__(self, index: int):
            self.index = index
            self.train_split, self.test_split = plain_training.load_site_arrays(sites[index])

        def fit(self, parameters, config):
            seed = int(config.get("round", 0)) * 1000 + self.index
            weights = plain_training.train(template, parameters, self.train_split, recipe, seed)
            return weights, len(self.train_split.y), {"torch_threads": torch.get_num_threads()}

        def evaluate(self, parameters, config):
            metrics = plain_training.evaluate(template, parameters, self.test_split)
            return metrics["log_loss"], len(self.test_split.y), metrics

    def client_fn(context: Context):
        return PlainClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])


def server_app(initial: list[np.ndarray], n_sites: int, rounds: int, secagg: SecAggParams | None,
               on_round: Callable[[int], None], observed: dict[str, Any]) -> Any:
    """`observed["site_torch_threads"]`: the CPU threads torch used in the sites' processes."""
    from flwr.app import Context
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import Grid, ServerApp

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):  # type: ignore[override]
            observed["site_torch_threads"] = sorted({int(r.metrics.get("torch_threads", 0)) for _, r in results})
            return super().aggregate_fit(server_round, results, failures)

        def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[override]
            if failures:
                raise RuntimeError(f"plain Flower round {server_round}: {len(failures)} site(s) failed: {failures[0]}")
            out = super().aggregate_evaluate(server_round, results, failures)
            on_round(server_round)
            return out

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n_sites,
                               min_evaluate_clients=n_sites, min_available_clients=n_sites,
                               initial_parameters=ndarrays_to_parameters(initial),
                               on_fit_config_fn=lambda r: {"round": r})
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit = None if secagg is None else SecAggPlusWorkflow(
            num_shares=secagg.num_shares, reconstruction_threshold=secagg.reconstruction_threshold,
            max_weight=secagg.max_weight, clipping_range=secagg.clipping_range,
            quantization_range=secagg.quantization_range)
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)

    return app


def run(template: nn.Module, sites: list[Path], recipe: Recipe, rounds: int, secagg: SecAggParams | None,
        on_round: Callable[[int], None], cpus_per_site: float = 1.0) -> dict[str, Any]:
    """Flower's simulation engine with the same resources spine-fl's runner asks for; what it observed."""
    import os

    import torch
    from flwr.simulation import run_simulation

    observed: dict[str, Any] = {}
    run_simulation(
        server_app=server_app(plain_training.get_weights(template), len(sites), rounds, secagg, on_round, observed),
        client_app=client_app(template, sites, recipe, secagg is not None),
        num_supernodes=len(sites),
        # the GPU share spine-fl's runner asks for (simulations/runner.py backend_config)
        backend_config={"client_resources": {"num_cpus": cpus_per_site,
                                             "num_gpus": 1.0 / len(sites) if torch.cuda.is_available() else 0.0},
                        "init_args": {"num_cpus": max(os.cpu_count() or 1, int(cpus_per_site)),
                                      "include_dashboard": False}},
    )
    return observed
