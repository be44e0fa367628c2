"""The site's Flower ClientApp: checks the round message, calls `client.federated`, replies with shared arrays.

A SuperNode starts a new process per message, so nothing is kept in memory between rounds:
the site file comes from node config (`site-file`), local-only parameters from the site's disk.
Every outgoing message is summarised in `<state_dir>/outgoing.jsonl` (what left this site).
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.federated import initial_shared, train_round
from client.site import effective_caps, load_site
from shared_models.config import compose, fingerprints

FINGERPRINT_MISMATCH = 4001  # Error code the coordinator records as a refusal


class FingerprintMismatch(RuntimeError):
    """The round's model config, tokenizer or objective is not the one this site has."""


def site_of(context: Context) -> dict:
    if "site-file" not in context.node_config and "partition-id" in context.node_config:
        return simulated_site(context)
    if "site-file" not in context.node_config:
        raise RuntimeError("this SuperNode has no node config `site-file`; start it with `python client/run.py --site NAME`")
    return load_site(Path(str(context.node_config["site-file"])), check_files=False)


def simulated_site(context: Context) -> dict:
    """A virtual site of the simulation runtime: its file is `federation.site_dir`/<partition-id>.yaml,
    written by `python -m simulations.run` (simulation nodes carry no node config of their own)."""
    from omegaconf import OmegaConf

    site_dir = compose(shlex.split(str(context.run_config.get("overrides", "")))).federation.site_dir
    if not site_dir:
        raise RuntimeError("a simulation node needs federation.site_dir (set by python -m simulations.run)")
    return OmegaConf.to_container(OmegaConf.load(Path(site_dir) / f"{int(context.node_config['partition-id'])}.yaml"))


def check_fingerprints(round_config: dict, mine: dict[str, str]) -> None:
    """Refuse to train when the coordinator's hashes differ from this site's."""
    theirs = {k.removeprefix("fingerprint_"): v for k, v in round_config.items() if k.startswith("fingerprint_")}
    wrong = [f"{name}: coordinator {theirs.get(name)}, site {value}" for name, value in mine.items() if theirs.get(name) != value]
    if wrong:
        raise FingerprintMismatch("the round's " + "; ".join(wrong) + " — this site refuses to train; "
                                  "update the site's fedcxr install/configs to the coordinator's version")


def requested_caps(round_config: dict) -> dict:
    return {k.removeprefix("privacy_"): v for k, v in round_config.items() if k.startswith("privacy_")}


def _arrays(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in params.items()})


def audit_outgoing(message: Message, context: Context, call_next) -> Message:
    """Mod: record the names, shapes and scalars of every reply before it leaves the site."""
    reply = call_next(message, context)
    try:
        state_dir = Path(site_of(context)["state_dir"])
    except Exception:  # no usable site file: the handler's own error reply says why
        return reply
    entry = {"time": time.time(), "type": message.metadata.message_type, "error": None, "records": {}}
    if reply.has_error():
        entry["error"] = reply.error.reason
    else:
        for name, record in reply.content.items():
            if isinstance(record, ArrayRecord):
                entry["records"][name] = {"arrays": {k: [list(a.shape), a.dtype] for k, a in record.items()}}
            else:
                entry["records"][name] = {"values": dict(record)}
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "outgoing.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return reply


app = ClientApp(mods=[audit_outgoing])


@app.query()
def query(message: Message, context: Context) -> Message:
    """The seeded initial shared parameters (no data involved)."""
    site = site_of(context)
    params = initial_shared(dict(message.content["config"]), site)
    return Message(RecordDict({"arrays": _arrays(params), "site": ConfigRecord({"name": site["name"]})}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    site = site_of(context)
    round_config = dict(message.content["config"])
    cfg = compose(shlex.split(str(context.run_config.get("overrides", ""))))
    try:
        check_fingerprints(round_config, fingerprints(cfg))
    except FingerprintMismatch as err:
        return Message(Error(FINGERPRINT_MISMATCH, str(err)), reply_to=message)
    round_config["privacy"] = effective_caps(site["privacy"], requested_caps(round_config))
    if site.get("threads"):
        import torch

        torch.set_num_threads(int(site["threads"]))

    shared = {name: array.numpy() for name, array in message.content["arrays"].items()}
    new_shared, examples, metrics = train_round(shared, round_config, site, run_id=str(round_config["run"]))
    content = RecordDict({
        "arrays": _arrays(new_shared),
        "metrics": MetricRecord({**metrics, "examples": examples}),
        "site": ConfigRecord({"name": site["name"]}),
    })
    return Message(content, reply_to=message)
