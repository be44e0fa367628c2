"""The coordinator's Flower ServerApp: the federation's strategy (server/strategy.py, Flower's strategy classes) run
round by round; every reply checked and its influence bounded (server/trust_boundary.py); each round checkpointed
and recorded in the run registry.

The rounds are this module's loop (`Federation.run`), not Flower's `Strategy.start`, which counts rounds from 1 over
`grid.send_and_receive` and so cannot: resume a run at round k with the server optimizer's moments and the sites'
schedule in step; send the round to a site that (re)connects while replies are outstanding (`exchange`); ask a busy
SuperLink again after a 500; tell which node asked a reply answers for when the SuperLink answers for a node that
went away; record each refused reply and a skipped or too-small round; carry a SecAgg+ round (a four-stage workflow,
not one configure/aggregate pair); or checkpoint each round with the optimizer state.
"""
from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid
from omegaconf import DictConfig, OmegaConf

from shared_models.privacy_config import validate_federation_privacy
from server.aggregation import Update
from server.central_dp import CentralDp
from server.checkpoints import discard_after, load_latest_valid, save_round
from server.influence import HISTORY_ROUNDS, Bounds
from server.registry import Registry
from server.secagg import secure_round
from server.rounds import round_config
from server.strategy import strategy_from_config
from server.trust_boundary import TrustBoundary
from shared_models.checkpoint import checkpoint_fingerprints
from shared_models.config import RenamedKeyError, compose, config_hash
from shared_models.export import export
from shared_models.factory import create_model
from shared_models.model import schedule_notice
from shared_models.sharing import split_state
from shared_models.transfer import contiguous, encode_arrays
from server.validation import RunConfigError, SiteReply, run_config_problems

log = logging.getLogger("fedcxr.server")
app = ServerApp()


def to_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(contiguous(value)) for name, value in params.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def exchange(grid: Grid, message_to, nodes: list[int], timeout_s: float, poll_s: float,
             admit_every_s: float = 2.0, admit_late: bool = True) -> tuple[list[int], list[tuple[int, Message]]]:
    """Send `message_to(node)` to each node and collect replies until all have come back or `timeout_s` has passed.

    With `admit_late`, a node that connects while replies are outstanding is sent the round too: a site restarted
    after a crash rejoins the round in progress instead of waiting for the next one. Returns (nodes asked,
    (node, reply) pairs): the node is the one asked, since the SuperLink itself answers for a node that has gone
    away. Flower's `grid.send_and_receive` admits no late node, stops at a SuperLink's 500 and returns bare replies."""
    asked = list(nodes)
    node_of = dict(zip(grid.push_messages([message_to(node) for node in asked]), asked))
    pending = set(node_of)
    replies: list[tuple[int, Message]] = []
    deadline = time.monotonic() + timeout_s
    admitted = time.monotonic()
    while pending and time.monotonic() < deadline:
        try:
            pulled = list(grid.pull_messages(list(pending)))
            if admit_late and time.monotonic() - admitted > admit_every_s:
                admitted = time.monotonic()
                late = sorted(set(grid.get_node_ids()) - set(asked))
                if late:
                    log.info("node(s) %s connected during the round: sending them the round too", late)
                    asked += late
                    sent = dict(zip(grid.push_messages([message_to(node) for node in late]), late))
                    node_of |= sent
                    pending |= set(sent)
        except httpx.HTTPStatusError as err:
            if err.response.status_code < 500:
                raise
            # A busy SuperLink answers 500 (e.g. its SQLite database locked); the replies wait there: ask again.
            log.warning("asking the SuperLink failed (%s); asking again", err.response.status_code)
            pulled = []
        for reply in pulled:
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append((node_of[reply.metadata.reply_to_message_id], reply))
        if pending:
            time.sleep(poll_s)
    return asked, replies


def node_ids_per_run(grid: Grid) -> bool:
    """Whether the nodes get new ids each time the Flower run restarts: Flower's simulation runtime, whose grid is
    in memory and whose virtual SuperNodes it creates anew for each run. A deployment's node keeps its id across
    runs (it is registered with the SuperLink by its public key), so a resumed run holds each site name to the node
    stored in the registry (server/validation.py:SiteNames).

    This follows from the runtime, not from any setting: sites never control the server's configuration, and the
    coordinator, the server's operator, sets the run config (as anyone reaching the SuperLink's control API could:
    docs/security.md), yet neither can switch a deployment's ServerApp, which talks to the SuperLink over the
    network, into rebinding names."""
    return isinstance(grid, InMemoryGrid)


def wait_for_sites(grid: Grid, fed: DictConfig) -> list[int]:
    deadline = time.monotonic() + float(fed.wait_for_sites_s)
    while len(nodes := sorted(grid.get_node_ids())) < int(fed.min_sites):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} SuperNode(s) connected after {fed.wait_for_sites_s} s; "
                               f"federation.min_sites={fed.min_sites}")
        time.sleep(float(fed.poll_s))
    return nodes


def check_supported(cfg: DictConfig) -> None:
    """Refuse, before any site is asked, a run this ServerApp cannot carry out as configured: one RunConfigError
    naming every problem."""
    problems = run_config_problems(cfg)
    try:
        validate_federation_privacy(cfg)
    except (ValueError, TypeError) as err:
        problems.append(str(err))
    if problems:
        raise RunConfigError("the run's configuration is refused before round 1:\n  - " + "\n  - ".join(problems))


def initial_model(cfg: DictConfig):
    """The model every site also builds from `cfg.seed`: its shared parameters start the run, its tokenizer
    goes into every checkpoint."""
    return create_model(cfg, seed=int(cfg.seed))


def _weighted_metrics(accepted: list[SiteReply]) -> dict[str, float]:
    total = sum(r.weight for r in accepted)
    names = set.intersection(*(set(r.metrics) for r in accepted))
    means = {k: sum(r.metrics[k] * r.weight for r in accepted) / total for k in sorted(names)}
    return means | {"examples": int(total) if float(total).is_integer() else total}   # the weights aggregation used


@dataclass
class RoundExchange:
    """What one round's messaging produced: the nodes asked, the replies that passed the trust boundary, and the
    bytes of parameters each way."""

    asked: list[int]
    accepted: list[SiteReply]
    bytes_to_sites: int
    bytes_to_server: int

    def registry_fields(self) -> dict[str, int]:
        # the registry's columns are named from the server's side: sent to the sites, received from them
        return dict(sites_asked=len(self.asked), sites_accepted=len(self.accepted), bytes_sent=self.bytes_to_sites,
                    bytes_received=self.bytes_to_server)


class Federation:
    """One run: resume or start, then rounds until `federation.rounds`. A round waits for the sites, asks those the
    strategy's turn names (`exchange`, or SecAgg+'s workflow), lets the trust boundary check the replies, has the
    strategy combine them (or central DP in its place), then checkpoints and records the round."""

    def __init__(self, grid: Grid, cfg: DictConfig, flwr_run_id: int | None = None, node_ids_per_run: bool = False):
        check_supported(cfg)
        self.grid, self.cfg, self.fed = grid, cfg, cfg.federation
        self.flwr_run_id = str(flwr_run_id) if flwr_run_id is not None else None
        self.run_name = self.fed.run_name or time.strftime("%Y-%m-%d_%H-%M-%S")
        self.run_dir = Path(self.fed.output_dir) / self.run_name
        self.registry = Registry(self.fed.registry or Path(self.fed.output_dir) / "registry.sqlite")
        self.strategy = strategy_from_config(self.fed)
        self.trust = TrustBoundary(self.registry, self.run_name, Bounds.from_config(self.fed), node_ids_per_run)
        central = OmegaConf.select(cfg, "privacy.central_dp")
        self.central_dp = CentralDp.from_config(central) if central else None
        self.secagg = OmegaConf.select(cfg, "privacy.secagg")
        self.connected_nodes: int | None = None   # at the current round's start: each site's share of the rounds
        self.model = initial_model(cfg)
        self.fingerprints = checkpoint_fingerprints(cfg, self.model.tokenizer)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.config_hash = config_hash(cfg)
        # The schedule counts each site's local steps, which continue over the rounds.
        notice = schedule_notice(cfg.objective, int(self.fed.rounds) * int(self.fed.local_steps),
                                 f"{self.strategy.schedule_trainer} ({self.fed.rounds} rounds x "
                                 f"{self.fed.local_steps} local steps)")
        if notice:
            log.warning(notice)

    def _starting_point(self) -> tuple[int, dict[str, np.ndarray] | None]:
        latest = load_latest_valid(self.run_dir)
        if not self.fed.resume:
            if latest is not None:
                raise RuntimeError(f"{self.run_dir} already has checkpoints up to round {latest.round}; set "
                                   "federation.resume=true to continue it, or choose another federation.run_name")
            return 1, None
        if latest is None:
            raise RuntimeError(f"federation.resume=true but {self.run_dir} has no complete checkpoint to resume from")
        stored = latest.meta.get("fingerprints") or {}
        # model and objective decide the model (the tokenizer's spec is part of `model`)
        if any(stored.get(key) != self.fingerprints[key] for key in ("model", "objective")):
            raise RuntimeError(f"cannot resume {self.run_name}: model/tokenizer/objective changed since round "
                               f"{latest.round} ({latest.meta.get('fingerprints')} != {self.fingerprints})")
        discard_after(self.run_dir, latest.round)
        self.strategy.load_server_state(latest.server_state)   # a server optimizer's moments
        self.trust.norm_history = [float(n) for n in latest.meta.get("update_norms", [])]
        log.info("resuming run %s after its last complete round %d", self.run_name, latest.round)
        return latest.round + 1, latest.params

    def run(self) -> None:
        start, params = self._starting_point()
        self.registry.start_run(self.run_name, self.flwr_run_id, int(self.fed.rounds), self.config, self.config_hash)
        try:
            if params is None:   # encoder-only sharing: the parameters `model.sharing` sends (shared_models/sharing.py)
                params = {k: v.detach().numpy().copy() for k, v in split_state(self.model, self.cfg)[0].items()}
            for round_ in range(start, int(self.fed.rounds) + 1):
                params = self.round(round_, params)
            export(self.run_dir / "checkpoint", self.run_dir / "export")
        except Exception as err:
            self.registry.finish_run(self.run_name, error=str(err))
            raise
        self.registry.finish_run(self.run_name)
        log.info("run %s finished: %d rounds, checkpoint at %s, encoders exported to %s", self.run_name,
                 self.fed.rounds, self.run_dir / "checkpoint", self.run_dir / "export")

    def _round_config(self, round_: int) -> dict:
        rounds = int(self.fed.rounds)
        site_rounds = self.strategy.site_rounds(self.connected_nodes, rounds) if self.connected_nodes else rounds
        return round_config(self.cfg, round_, self.run_name, self.fingerprints, site_rounds)

    def round(self, round_: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.monotonic()
        connected = wait_for_sites(self.grid, self.fed)
        self.connected_nodes = len(connected)
        nodes = self.strategy.sites_of_round(connected, round_)
        if self.central_dp:   # site_fraction < 1: each site asked with that probability (secret coins)
            nodes = self.central_dp.sample_sites(nodes)
        exchanged = (self._secure_exchange if self.secagg else self._exchange)(round_, params, nodes)
        accepted = exchanged.accepted
        if not accepted and self.strategy.one_site_per_round:
            # The one site asked sent nothing usable (its rejection is recorded): the model stays as it was and
            # the next round asks the next site, as cyclic weight transfer passes over an absent institution.
            self.registry.add_round(self.run_name, round_, status="skipped", metrics={},
                                    seconds=time.monotonic() - started, **exchanged.registry_fields())
            log.warning("round %d/%d: node %s sent no valid update; the global model is unchanged and the next "
                        "round asks the next site", round_, self.fed.rounds, exchanged.asked[0])
            return params
        # median and trimmed_mean need 3 updates to trim anything, whatever min_sites says
        needed = max(int(self.fed.min_sites), self.strategy.quorum)
        if len(accepted) < needed and not self.strategy.one_site_per_round:
            self.registry.add_round(self.run_name, round_, status="too_few_sites", metrics={},
                                    seconds=time.monotonic() - started, **exchanged.registry_fields())
            raise RuntimeError(f"round {round_}: {len(accepted)} accepted update(s), {needed} needed (federation."
                               f"min_sites={self.fed.min_sites}, strategy {self.fed.strategy}); the run can resume "
                               f"from round {round_ - 1} with federation.resume=true")

        if self.central_dp:   # DP-FedAvg in the strategy's place (server/central_dp.py: why not Flower's wrapper)
            params = self.central_dp.aggregate(params, [r.update for r in accepted], len(connected))
        elif self.secagg:   # one update: the sites' example-weighted mean, all the server ever sees
            mean = Update(accepted[0].update, sum(r.weight for r in accepted))
            params = self.strategy.aggregate_updates(params, [mean])
        else:
            params = self.strategy.aggregate_updates(params, [Update(r.update, r.weight) for r in accepted])
        metrics = _weighted_metrics(accepted)
        if self.central_dp:   # central epsilon after this round and of one round (server/central_dp.py)
            metrics.update(self.central_dp.round_metrics(round_))
        seconds = time.monotonic() - started
        self._checkpoint(round_, params, accepted, metrics)
        self.registry.add_round(self.run_name, round_, status="complete", metrics=metrics, seconds=seconds,
                                **exchanged.registry_fields())
        loss = f", loss {metrics['loss']:.4f}" if "loss" in metrics else ""
        log.info("round %d/%d: %d/%d sites%s, %.1f s", round_, self.fed.rounds, len(accepted), len(exchanged.asked),
                 loss, seconds)
        return params

    def _checkpoint(self, round_: int, params: dict[str, np.ndarray], accepted: list[SiteReply], metrics: dict) -> None:
        meta = {"run": self.run_name, "flwr_run_id": self.flwr_run_id, "config_hash": self.config_hash,
                "fingerprints": self.fingerprints, "strategy": self.fed.strategy, "metrics": metrics,
                "sites": {r.site: r.examples for r in accepted}, "shared": sorted(params), "config": self.config,
                "influence": {r.site: {"weight": r.weight, "update_norm": r.norm, "scale": r.scale, "notes": r.notes}
                              for r in accepted},
                "update_norms": self.trust.norm_history[-HISTORY_ROUNDS:]}
        folder, written = save_round(self.run_dir, round_, params, meta, self.strategy.server_state(),
                                     tokenizer=self.model.tokenizer)
        self.registry.add_checkpoint(self.run_name, round_, folder, written["sha256"]["model.safetensors"])

    def _exchange(self, round_: int, params: dict[str, np.ndarray], nodes: list[int]) -> RoundExchange:
        """Send the round to `nodes` and pass each reply through the trust boundary."""
        wire = encode_arrays(params, self.fed.transfer_dtype)
        content = RecordDict({"arrays": to_record(wire), "config": ConfigRecord(self._round_config(round_))})

        def message_to(node: int) -> Message:
            return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(round_),
                           ttl=float(self.fed.round_timeout_s))

        # A cyclic round asks its one site only; the others wait for their turn.
        nodes, replies = exchange(self.grid, message_to, nodes, float(self.fed.round_timeout_s), float(self.fed.poll_s),
                                  admit_late=not self.strategy.one_site_per_round)
        self.trust.reject_unanswered(round_, nodes, {node for node, _ in replies},
                                     f"no reply within {self.fed.round_timeout_s} s")
        to_server = sum(reply.content["arrays"].count_bytes() for _, reply in replies if not reply.has_error()
                        and isinstance(reply.content.get("arrays"), ArrayRecord))
        return RoundExchange(nodes, self.trust.accept(round_, params, replies),
                             len(nodes) * content["arrays"].count_bytes(), to_server)

    def _secure_exchange(self, round_: int, params: dict[str, np.ndarray], nodes: list[int]) -> RoundExchange:
        """As `_exchange`, under SecAgg+ (server/secagg.py): the bytes are those of the global parameters sent,
        masked replies are not counted."""
        result = secure_round(self.grid, nodes, params, round_, self._round_config(round_), dict(self.secagg),
                              float(self.fed.round_timeout_s))
        self.trust.reject_unanswered(round_, nodes, {site.node for site in result.sites},
                                     "dropped out of the SecAgg+ round (refused, failed or no reply within "
                                     f"{self.fed.round_timeout_s} s per stage)")
        to_sites = len(nodes) * sum(np.asarray(v).nbytes for v in params.values())
        return RoundExchange(nodes, self.trust.accept_secure(round_, params, result), to_sites, 0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    # force: an imported library (opacus) has already configured the root logger at WARNING
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per SuperLink request otherwise
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    try:
        federation = Federation(grid, compose(overrides), flwr_run_id=context.run_id,
                                node_ids_per_run=node_ids_per_run(grid))
    except (RunConfigError, RenamedKeyError) as err:
        log.error("%s", err)
        raise RunConfigError(str(err)) from None   # Flower marks the run failed with this message
    federation.run()
