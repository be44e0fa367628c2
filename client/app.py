"""The site's Flower ClientApp: checks the round message, calls `client.federated`, replies with shared arrays.

A SuperNode starts a new process per message, so nothing is kept in memory between rounds:
the site file comes from node config (`site-file`), local-only parameters from the site's disk.
Every outgoing message is summarised in `<state_dir>/outgoing.jsonl` (what left this site).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secagg import secure_aggregation
from client.federated import (FingerprintMismatch, RoundConfigError, query_model_settings, run_settings,
                              shared_arrays, train_round, validate_round_config)
from client.policy import PolicyRefused, accepted_overrides, enforce_policy
from client.site import load_site
from shared_models.config import RenamedKeyError, compose
from shared_models.factory import create_model
from shared_models.transfer import contiguous, decode_arrays, encode_arrays

# Error codes of a refusal: the coordinator records the reason and goes on with the other sites.
FINGERPRINT_MISMATCH = 4001
BUDGET_EXCEEDED = 4002
POLICY_REFUSED = 4003          # the run asks for what the site's policy or override allow-list does not accept
ROUND_CONFIG_REFUSED = 4004    # a number in the round's config is missing, not finite or out of range
log = logging.getLogger("client.app")


def is_simulation_node(context: Context) -> bool:
    """A virtual site of the simulation runtime (no site file of its own, a partition id instead)."""
    return "site-file" not in context.node_config and "partition-id" in context.node_config


def site_of(context: Context) -> dict:
    if is_simulation_node(context):
        return simulated_site(context)
    if "site-file" not in context.node_config:
        raise RuntimeError("this SuperNode has no node config `site-file`; start it with `python client/run.py --site NAME`")
    return load_site(Path(str(context.node_config["site-file"])), check_files=False)


def simulated_site(context: Context) -> dict:
    """A virtual site of the simulation runtime: its file is `federation.site_dir`/<partition-id>.yaml,
    written by `python -m simulations.run` (simulation nodes carry no node config of their own)."""
    from omegaconf import OmegaConf

    site_dir = composed_overrides(context).federation.site_dir
    if not site_dir:
        raise RuntimeError("a simulation node needs federation.site_dir (set by python -m simulations.run)")
    return OmegaConf.to_container(OmegaConf.load(Path(site_dir) / f"{int(context.node_config['partition-id'])}.yaml"))


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, ValueError, IndexError):
        return None


def _arrays(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(contiguous(value)) for name, value in params.items()})


def _summary(value):
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return f"<{len(value)} byte strings, {sum(map(len, value))} bytes>"
    return value


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
            else:   # SecAgg+ replies carry keys and masked vectors as bytes: record their sizes
                entry["records"][name] = {"values": {k: _summary(v) for k, v in record.items()}}
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "outgoing.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    return reply


# audit_outgoing first, so it records what leaves after SecAgg+ has masked it; only SecAgg+'s collect stage calls
# the lambda, so `secure=True` tells train_content the round's update leaves masked
app = ClientApp(mods=[audit_outgoing,
                      secure_aggregation(lambda content, context: train_content(content, context, secure=True))])


def composed_overrides(context: Context):
    """The config composed from the ServerApp's Hydra overrides that pass this site's allow-list
    (client/policy.py accepted_overrides; PolicyRefused names one that does not)."""
    try:
        overrides = shlex.split(str(context.run_config.get("overrides", "")))
    except ValueError as err:
        raise PolicyRefused(f"the run config's overrides cannot be split into Hydra overrides ({err})") from None
    try:
        return compose(accepted_overrides(overrides, simulated=is_simulation_node(context)))
    except RenamedKeyError as err:
        raise PolicyRefused(str(err)) from None


def run_config(context: Context):
    """What this site builds and trains with from the run's overrides: model, objective, `train`, privacy. The
    round's own settings (steps, batch size, lr, seed, rounds, ...) are not taken from them but from each round's
    config record (client/federated.py:run_settings)."""
    return run_settings(composed_overrides(context))


def refusal(code: int, site: dict | None, err: Exception) -> Error:
    """The Error reply of a refused message, logged here too (outgoing.jsonl records it as it leaves)."""
    name = (site or {}).get("name", "?")
    log.warning("site %s refuses the round: %s", name, err)
    return Error(code, f"site {name}: {err}")


@app.query()
def query(message: Message, context: Context) -> Message:
    """The seeded initial shared parameters this site builds (no data involved); the coordinator builds its own,
    so this answers diagnostics only (e.g. checking that a site's install initialises like the coordinator's).
    The seed and the schedule's span come from the query's config record, as a round's come from its own."""
    site = site_of(context)
    try:
        config = dict(message.content["config"]) if "config" in message.content.config_records else {}
        model_settings = query_model_settings(config)
        cfg = run_config(context)
        enforce_policy(site, cfg)
    except PolicyRefused as err:
        return Message(refusal(POLICY_REFUSED, site, err), reply_to=message)
    except RoundConfigError as err:
        return Message(refusal(ROUND_CONFIG_REFUSED, site, err), reply_to=message)
    params = shared_arrays(create_model(cfg, **model_settings), cfg)
    return Message(RecordDict({"arrays": _arrays(params), "site": ConfigRecord({"name": site["name"]})}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = train_content(message.content, context)
    return Message(reply, reply_to=message)


def train_content(content: RecordDict, context: Context, secure: bool = False) -> RecordDict | Error:
    """The round's reply content (shared arrays, metrics, site name), or an Error that refuses the round.

    Before anything is built or read: the round's numbers (validate_round_config), the coordinator's overrides
    (allow-list) and the composed config against the site's policy; a refusal names the setting. secure: the
    round came through SecAgg+ (its reply leaves masked)."""
    # Deployment starts a ClientApp process per message: its age is the start-up cost (interpreter, imports,
    # fetching this message). A simulation's ClientApp lives on in a worker process, so there it means nothing.
    startup_s = process_age_s() if "site-file" in context.node_config else None
    site = site_of(context)
    try:
        if "config" not in content.config_records or "arrays" not in content.array_records:
            raise RoundConfigError("the round's message lacks its `config` or `arrays` record")
        round_config = validate_round_config(dict(content["config"]))
        cfg = run_config(context)
        enforce_policy(site, cfg, round_config, secure)
    except PolicyRefused as err:
        return refusal(POLICY_REFUSED, site, err)
    except RoundConfigError as err:
        return refusal(ROUND_CONFIG_REFUSED, site, err)
    if site.get("threads"):
        import torch

        torch.set_num_threads(int(site["threads"]))
    shared = decode_arrays({name: array.numpy() for name, array in content["arrays"].items()})
    try:
        new_shared, examples, metrics = train_round(shared, round_config, site, str(round_config["run_name"]), cfg)
    except FingerprintMismatch as err:
        return Error(FINGERPRINT_MISMATCH, str(err))
    except RoundConfigError as err:
        return refusal(ROUND_CONFIG_REFUSED, site, err)
    except Exception as err:
        # imported here: opacus (behind client.privacy) costs every non-DP ClientApp process seconds of start-up
        from client.privacy import BudgetExceeded
        from client.privacy.disclosure import withheld_error

        if not isinstance(err, BudgetExceeded):
            withheld = withheld_error(err, cfg)   # under DP-SGD / SecAgg+: a code and a fixed text, details logged here
            if withheld is None:
                raise
            return Error(*withheld)
        return Error(BUDGET_EXCEEDED, f"site {site['name']} privacy budget: {err}")
    if "seconds" in metrics and startup_s is not None:  # timings leave only where wall time already does (not DP)
        metrics["startup_s"] = startup_s
    return RecordDict({
        "arrays": _arrays(encode_arrays(new_shared, str(round_config.get("transfer_dtype", "float32")))),
        "metrics": MetricRecord({**metrics, "examples": examples}),
        "site": ConfigRecord({"name": site["name"]}),
    })
