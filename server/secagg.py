"""One round's exchange under SecAgg+: Flower's SecAggPlusWorkflow carries it, the server learns only the mean.

The workflow is written for Flower's legacy Strategy API, so this module gives it the minimum it asks for: a
client manager holding the round's nodes and a strategy that hands every node the same fit instructions and
keeps what the workflow aggregates. Sites send their change to the global floating-point parameters (small
numbers, well inside SecAgg+'s clipping range; its stochastic quantisation keeps the mean unbiased) weighted by
their example counts; what comes back is the example-weighted mean change and each site's scalar metrics
(which are not masked).
Integer arrays (BatchNorm's step counters, unused with a momentum) are left out of the sum and keep their value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from shared_models.transfer import SECAGG_MAX_WEIGHT_KEY, SECAGG_NAMES_KEY


class SecureSite(NamedTuple):
    """One site of a SecAgg+ round as the server sees it: its masked share is in the mean, these are in the clear."""

    node: int
    examples: int
    metrics: dict


@dataclass
class SecureRound:
    """What a SecAgg+ round tells the server: the weighted mean change, and per site its examples and metrics."""

    mean_delta: dict[str, np.ndarray] | None
    sites: list[SecureSite] = field(default_factory=list)
    failures: int = 0


class _SameInstructions(Strategy):
    """The legacy strategy the workflow calls: the same FitIns for every node; keeps the aggregate it is given."""

    def __init__(self, config: dict):
        self.config = config
        self.results: list[tuple[GridClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, FitIns(parameters, self.config)) for proxy in client_manager.all().values()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_round(grid: Grid, nodes: list[int], params: dict[str, np.ndarray], round_: int, round_config: dict,
                 secagg: dict, timeout_s: float) -> SecureRound:
    """Run SecAgg+ (`secagg`: the `privacy.secagg` settings) with `nodes` on the global `params`; sites answer
    with their masked, example-weighted change."""
    names = sorted(name for name, value in params.items() if np.issubdtype(np.asarray(value).dtype, np.floating))
    max_weight = float(secagg["max_weight"])
    strategy = _SameInstructions({**round_config, SECAGG_NAMES_KEY: "\n".join(names),
                                  SECAGG_MAX_WEIGHT_KEY: max_weight})
    clients = SimpleClientManager()
    for node in nodes:
        clients.register(GridClientProxy(node, grid, grid.run.run_id))
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([params[name] for name in names]), keep_input=True)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=strategy, client_manager=clients)
    workflow = SecAggPlusWorkflow(
        num_shares=secagg["num_shares"], reconstruction_threshold=secagg["reconstruction_threshold"],
        max_weight=max_weight, clipping_range=float(secagg["clipping_range"]),
        quantization_range=int(secagg["quantization_range"]), timeout=timeout_s)
    workflow(grid, context)
    if not strategy.results:
        return SecureRound(None, failures=len(nodes))
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    sites = [SecureSite(proxy.node_id, int(res.num_examples), dict(res.metrics)) for proxy, res in strategy.results]
    return SecureRound(dict(zip(names, mean)), sites, failures=len(nodes) - len(sites))
