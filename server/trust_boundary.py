"""The round's trust boundary: each site's reply validated (server/validation.py), its site name bound to its node,
its influence bounded (server/influence.py); every reply refused is recorded in the registry with its reasons and the
round goes on with the rest."""
from __future__ import annotations

import logging

import numpy as np
from flwr.app import Message

from server.influence import HISTORY_ROUNDS, Bounds, bound_influence, reference_norm
from server.secagg import SecureRound
from server.validation import Params, SiteNames, SiteReply, read_metrics, read_reply, site_name_problem

log = logging.getLogger("fedcxr.server")


class TrustBoundary:
    """One run's checks on replies, with what they remember across rounds: who is who (`site_names`) and the last
    rounds' reference update norms (`norm_history`, checkpointed so a resumed run holds updates to the same bound).
    `node_ids_per_run`: see server/validation.py:SiteNames."""

    def __init__(self, registry, run: str, bounds: Bounds, node_ids_per_run: bool = False):
        self.registry, self.run, self.bounds = registry, run, bounds
        self.node_ids_per_run = node_ids_per_run
        self.norm_history: list[float] = []
        self._site_names: SiteNames | None = None

    @property
    def site_names(self) -> SiteNames:
        """Who is who in this run, read from the registry once the run is recorded there."""
        if self._site_names is None:
            self._site_names = SiteNames(self.registry, self.run, self.node_ids_per_run)
        return self._site_names

    def reject(self, round_: int, site: str, node: int, problems: list[str]) -> None:
        log.warning("round %d: update from site %s rejected: %s", round_, site, "; ".join(problems))
        self.registry.add_rejection(self.run, round_, site, node, problems)

    def reject_unanswered(self, round_: int, nodes: list[int], answered: set[int], why: str) -> None:
        """Record each node asked that did not answer."""
        for node in sorted(set(nodes) - answered):
            self.reject(round_, f"node {node}", node, [why])

    def accept(self, round_: int, params: Params, replies: list[tuple[int, Message]]) -> list[SiteReply]:
        """The replies that pass, from (node asked, reply) pairs, with bounded updates and capped weights."""
        checked = []
        for node, reply in replies:
            if reply.has_error():
                self.reject(round_, f"node {node}", node, [f"site refused or failed: {str(reply.error.reason)[:500]}"])
                continue
            site_reply, label, problems = read_reply(reply, node, params)
            if not problems and (conflict := self.site_names.claim(round_, label, node, site_reply.examples)):
                problems = [conflict]
            if problems:
                self.reject(round_, label, node, problems)
                continue
            checked.append(site_reply)
        # replies arrive in whatever order the sites finish; the aggregate's floating-point sum must not depend on
        # it, or a seeded run would not repeat (the first claim of a name above still goes by arrival)
        checked.sort(key=lambda site_reply: (site_reply.site, site_reply.node))
        accepted, rejected = bound_influence(params, checked, self.norm_history, self.bounds,
                                             self.site_names.first_examples)
        for reply, problems in rejected:
            self.reject(round_, reply.site, reply.node, problems)
        self._record_accepted(round_, accepted)
        return accepted

    def accept_secure(self, round_: int, params: Params, result: SecureRound) -> list[SiteReply]:
        """A SecAgg+ round's sites: every accepted entry carries the same update, the sites' weighted mean (integer
        arrays keep their value). Each site's name and metrics are checked, but its masked share is already in the
        mean: only the mean's norm can be bounded (against max_update_norm and the last rounds')."""
        if result.mean_delta is None:
            return []
        mean = dict(params)
        for name, delta in result.mean_delta.items():
            mean[name] = (params[name].astype(np.float64) + delta).astype(params[name].dtype)
        checked = []
        for site in result.sites:
            metrics = dict(site.metrics)
            name = metrics.pop("site", f"node {site.node}")
            _, metrics, problems = read_metrics({**metrics, "examples": site.examples})
            problems = ([problem] if (problem := site_name_problem(name)) else []) + problems
            if not problems and (conflict := self.site_names.claim(round_, name, site.node, site.examples)):
                problems = [conflict]
            if problems:
                self.reject(round_, str(name)[:64], site.node, problems + ["(its masked share is in the mean already)"])
                continue
            checked.append(SiteReply(name, site.node, mean, site.examples, metrics, weight=float(site.examples)))
        if not checked:
            return []
        bounded, rejected = bound_influence(params, [SiteReply("mean", 0, mean, 1, {})], self.norm_history,
                                            self.bounds, {})
        if rejected:
            self.reject(round_, "mean of the SecAgg+ round", 0, rejected[0][1])
            return []
        for reply in checked:
            reply.update, reply.norm, reply.scale, reply.notes = (bounded[0].update, bounded[0].norm, bounded[0].scale,
                                                                  bounded[0].notes)
        self._record_accepted(round_, checked)
        return checked

    def _record_accepted(self, round_: int, accepted: list[SiteReply]) -> None:
        for reply in accepted:
            if reply.notes:
                log.warning("round %d: site %s: %s", round_, reply.site, "; ".join(reply.notes))
            self.registry.add_site_metrics(self.run, round_, reply.site, reply.node, reply.examples, reply.metrics)
        if (norm := reference_norm(accepted)) is not None:
            self.norm_history = (self.norm_history + [norm])[-HISTORY_ROUNDS:]
