"""The federation's aggregation rules as Flower strategies: one `flwr.serverapp.strategy` subclass per
`federation.strategy`, built by `strategy_from_config`.

Each class is Flower's strategy of the same rule and keeps its settings under Flower's names (FedOpt's `eta`,
`beta_1`, `beta_2`, `tau`; FedAvgM's `server_learning_rate`, `server_momentum`; FedTrimmedAvg's `beta`; FedProx's
`proximal_mu`). The ServerApp calls one hook, `aggregate_updates(global, updates)`, on decoded numpy arrays: every
reply has been validated and its influence bounded before a rule sees it (server/validation.py, server/influence.py),
so the rule gets (parameters, capped weight) pairs, not Messages. Flower's Message-level `aggregate_train` goes
through the same hook, so a class gives the same model inside Flower's own `Strategy.start`. The ServerApp also
asks the strategy object which sites a round asks (`sites_of_round`), how many rounds one site trains
(`site_rounds`, what its DP-SGD plans for) and whose steps the schedule counts (`schedule_trainer`).

What the hook keeps from server/aggregation.py instead of Flower's arithmetic, each pinned by a test:
  - sums in float64, cast back to each array's dtype (Flower's mean stays in float32 and turns integer step
    counters into floats);
  - median and trimmed mean refuse fewer than 3 updates, and the trimmed mean cuts at least one site per side
    (Flower's `int(beta * n)` cuts none with 3 or 4 sites);
  - FedAdam / FedYogi / FedAvgM step on the pseudo-gradient as Reddi et al.'s Algorithm 2 writes it (v starts at
    tau^2, no Adam bias correction), leave normalisation statistics at the sites' mean, and their moments go into
    every checkpoint (`server_state`) so a resumed run steps as an uninterrupted one.
"""
from __future__ import annotations

from typing import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr

from server.aggregation import (ROBUST_QUORUM, Params, ServerOptimizer, Update, coordinate_median, trimmed_mean,
                                weighted_mean)
from shared_models.privacy_config import ONE_SITE_PER_ROUND
from shared_models.transfer import contiguous

WEIGHT_KEY = "examples"   # the metric a site's reply weights by (client/app.py)


class ProjectRule:
    """The hook the ServerApp calls and what it reads from a rule; mixed in before the Flower class."""

    name: str          # the `federation.strategy` value
    quorum = 1         # the fewest accepted updates the rule can combine as meant

    @property
    def one_site_per_round(self) -> bool:
        """Cyclic weight transfer: one site asked per round, its update the model. The names are
        shared_models/privacy_config.py's, whose refusals (no SecAgg+ or central DP with one site) need them too."""
        return self.name in ONE_SITE_PER_ROUND

    def sites_of_round(self, nodes: list[int], round_: int) -> list[int]:
        """The SuperNodes asked in round `round_` (1-based): all of `nodes`, or one site per round in turn."""
        return [nodes[(round_ - 1) % len(nodes)]] if self.one_site_per_round else nodes

    def site_rounds(self, nodes: int, rounds: int) -> int:
        """The most rounds any one of `nodes` SuperNodes trains in a run of `rounds`: all of them, or with one site
        per round its turns. A site's DP-SGD sizes its noise for a target epsilon by these rounds' steps, so it never
        plans (and over-noises for) the rounds of the other sites."""
        return -(-rounds // max(nodes, 1)) if self.one_site_per_round else rounds

    def total_local_steps(self, rounds: int, local_steps: int, sites: int) -> int:
        """All sites' local steps over the run: what a centralized baseline with the same budget trains."""
        return rounds * local_steps * (1 if self.one_site_per_round else sites)

    @property
    def schedule_trainer(self) -> str:
        """Whose steps `rounds x local_steps` counts, for notices: each site's, continued over the rounds, or with
        one site per round the model's as it passes from site to site (round r starts at step (r - 1) x
        local_steps)."""
        return "the model passed from site to site" if self.one_site_per_round else "each site"

    @classmethod
    def settings_from_config(cls, fed) -> dict:
        """The Flower class's own settings, under its names, from the `federation` config group."""
        return {}

    def combine(self, updates: list[Update]) -> Params:
        return weighted_mean(updates)

    def aggregate_updates(self, global_params: Params, updates: list[Update]) -> Params:
        if not updates:
            raise ValueError("no valid update to aggregate")
        return self.combine(updates)

    def server_state(self) -> Params | None:
        """What a checkpoint keeps of the server's own state (None: the rule has none)."""
        return None

    def load_server_state(self, state: Params | None) -> None:
        pass

    # Flower's Message-level interface, over the same rule. Only Flower's own `Strategy.start` calls it (the test
    # that drives it shows the same model); the project's round loop (server/app.py) calls `aggregate_updates`.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_params = {name: array.numpy() for name, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []   # sites do not evaluate in rounds: evaluation runs on the exported encoders (evaluation/)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        updates = [Update({name: a.numpy() for name, a in msg.content[self.arrayrecord_key].items()},
                                  float(next(iter(msg.content.metric_records.values()))[self.weighted_by_key]))
                   for msg in valid]
        params = self.aggregate_updates(self.global_params, updates)
        metrics = self.train_metrics_aggr_fn([msg.content for msg in valid], self.weighted_by_key)
        return ArrayRecord({name: Array(contiguous(value)) for name, value in params.items()}), metrics


class FedAvg(ProjectRule, flwr.FedAvg):
    name = "fedavg"


class FedProx(ProjectRule, flwr.FedProx):
    """FedAvg at the server; the proximal term is the sites' (`proximal_mu` in each round's config)."""

    name = "fedprox"

    @classmethod
    def settings_from_config(cls, fed) -> dict:
        return dict(proximal_mu=float(fed.proximal_mu))


class Cyclic(FedAvg):
    """Cyclic weight transfer: the one site asked passes its model on (its update becomes the global model). Flower's
    FedXgbCyclic is the same idea for XGBoost trees, not arrays."""

    name = "cyclic"


class FedMedian(ProjectRule, flwr.FedMedian):
    name = "median"
    quorum = ROBUST_QUORUM["median"]

    def combine(self, updates: list[Update]) -> Params:
        return coordinate_median(updates)


class FedTrimmedAvg(ProjectRule, flwr.FedTrimmedAvg):
    name = "trimmed_mean"
    quorum = ROBUST_QUORUM["trimmed_mean"]

    @classmethod
    def settings_from_config(cls, fed) -> dict:
        return dict(beta=float(fed.trim_fraction))

    def combine(self, updates: list[Update]) -> Params:
        return trimmed_mean(updates, self.beta)


class ServerStep(ProjectRule):
    """A server optimizer step on the sites' weighted mean (`ServerOptimizer`, whose moments are checkpointed).

    Built from the Flower class's own settings: `optimizer_settings` maps ServerOptimizer's names to Flower's
    (FedOpt's here; FedAvgM has its own)."""

    kind: str
    optimizer_settings = {"lr": "eta", "beta1": "beta_1", "beta2": "beta_2", "tau": "tau"}

    def __init__(self, **settings):
        super().__init__(**settings)
        self.optimizer = ServerOptimizer(self.kind, **{ours: getattr(self, flowers)
                                                       for ours, flowers in self.optimizer_settings.items()})

    @classmethod
    def settings_from_config(cls, fed) -> dict:
        return dict(eta=float(fed.server_lr), beta_1=float(fed.beta1), beta_2=float(fed.beta2), tau=float(fed.tau))

    def aggregate_updates(self, global_params: Params, updates: list[Update]) -> Params:
        return self.optimizer.step(global_params, super().aggregate_updates(global_params, updates))

    def server_state(self) -> Params:
        return self.optimizer.state_dict()

    def load_server_state(self, state: Params | None) -> None:
        self.optimizer.load_state_dict(state)


class FedAdam(ServerStep, flwr.FedAdam):
    name, kind = "fedadam", "adam"


class FedYogi(ServerStep, flwr.FedYogi):
    name, kind = "fedyogi", "yogi"


class FedAvgM(ServerStep, flwr.FedAvgM):
    name, kind = "fedavgm", "momentum"
    optimizer_settings = {"lr": "server_learning_rate", "beta1": "server_momentum"}

    @classmethod
    def settings_from_config(cls, fed) -> dict:
        return dict(server_learning_rate=float(fed.server_lr), server_momentum=float(fed.beta1))


STRATEGIES: dict[str, type[ProjectRule]] = {cls.name: cls for cls in (FedAvg, FedProx, Cyclic, FedMedian,
                                                                       FedTrimmedAvg, FedAdam, FedYogi, FedAvgM)}


def strategy_from_config(fed) -> ProjectRule:
    """The strategy the `federation` config group names, with its settings."""
    cls = STRATEGIES.get(fed.strategy)
    if cls is None:
        raise ValueError(f"federation.strategy={fed.strategy!r} is unknown; choose one of {sorted(STRATEGIES)}")
    min_sites = int(fed.get("min_sites", 1))
    return cls(min_train_nodes=min_sites, min_available_nodes=min_sites, weighted_by_key=WEIGHT_KEY,
               **cls.settings_from_config(fed))
