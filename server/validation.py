"""What the ServerApp takes from outside, checked before use: the run's configuration before round 1, and every
site's reply (records, site name, examples, metrics, arrays) before it reaches aggregation.

A reply is untrusted bytes from a node: `read_reply` checks each part against what this round sent and returns
either a `SiteReply` or the list of everything wrong with it, never raises on malformed content. `SiteNames`
binds each site name to the first node that claimed it in the run (persisted in the registry).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from omegaconf import DictConfig, OmegaConf

from server.aggregation import ROBUST_QUORUM
from server.strategy import STRATEGIES
from shared_models.config import is_run_name
from shared_models.transfer import check_transfer_dtype

Params = dict[str, np.ndarray]

MAX_SITE_NAME = 64
MAX_METRICS = 64
MAX_METRIC_NAME = 64
METRIC_LIMIT = 1e9          # |metric| above this is absurd (losses, seconds, epsilon) and would swamp round means
MAX_EXAMPLES = 2**53        # above it a float no longer holds every integer
REPLY_RECORDS = {"arrays": ArrayRecord, "metrics": MetricRecord, "site": ConfigRecord}
COUNTERS = ("num_batches_tracked",)   # the integer arrays training changes (BatchNorm's step counter)


class RunConfigError(ValueError):
    """The run's configuration cannot be carried out; the message lists every problem found."""


# ------------------------------------------------------------------------------------------ run configuration
def run_name_problem(name) -> str | None:
    """Why `name` cannot name a run (it becomes a folder at the coordinator and at every site), or None."""
    if not is_run_name(name):
        return (f"federation.run_name={name!r} must be 1-64 letters, digits, '.', '_' or '-' (and not '.' or '..'): "
                "it names a folder at the coordinator and at every site")
    return None


def _number(value, *, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if integer and not isinstance(value, int):
        return None
    return value if math.isfinite(value) else None


def _check(problems: list[str], fed, key: str, *, integer: bool = False, low: float | None = None,
           high: float | None = None, low_open: bool = False, optional: bool = False,
           section: str = "federation") -> None:
    value = OmegaConf.select(fed, key, default=None)
    if value is None and optional:
        return
    number = _number(value, integer=integer)
    bounds = ([f"{'>' if low_open else '>='} {low}"] if low is not None else []) + ([f"<= {high}"] if high is not None else [])
    rule = ("an integer" if integer else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
    if (number is None or (low is not None and (number <= low if low_open else number < low))
            or (high is not None and number > high)):
        problems.append(f"{section}.{key}={value!r} must be {rule}" + (" or null" if optional else ""))


def run_config_problems(cfg: DictConfig) -> list[str]:
    """Everything wrong with the `federation` settings, and the rounds' `train.batch_size` / `train.lr`, that the
    ServerApp and the sites would act on."""
    fed = cfg.federation
    problems: list[str] = []
    _check(problems, fed, "rounds", integer=True, low=1)
    _check(problems, fed, "local_steps", integer=True, low=1)
    _check(problems, cfg.train, "batch_size", integer=True, low=1, high=65536, section="train")
    _check(problems, cfg.train, "lr", low=0, low_open=True, high=10, section="train")
    _check(problems, fed, "min_sites", integer=True, low=1)
    _check(problems, fed, "round_timeout_s", low=0, low_open=True)
    _check(problems, fed, "wait_for_sites_s", low=0)
    _check(problems, fed, "poll_s", low=0, low_open=True)
    _check(problems, fed, "proximal_mu", low=0)
    _check(problems, fed, "server_lr", low=0, low_open=True)
    _check(problems, fed, "beta1", low=0, high=1)
    _check(problems, fed, "beta2", low=0, high=1)
    _check(problems, fed, "tau", low=0, low_open=True)
    _check(problems, fed, "max_update_norm", low=0, low_open=True, optional=True)
    _check(problems, fed, "update_norm_factor", low=1, optional=True)
    _check(problems, fed, "max_examples_weight", low=1, optional=True)
    _check(problems, fed, "examples_growth_factor", low=1, optional=True)
    _check(problems, fed, "examples_weight_factor", low=1, optional=True)
    _check(problems, fed, "privacy.max_epsilon", low=0, low_open=True, optional=True)
    _check(problems, fed, "privacy.max_delta", low=0, low_open=True, high=1, optional=True)
    if not isinstance(OmegaConf.select(fed, "keep_optimizer_state", default=False), bool):
        problems.append(f"federation.keep_optimizer_state={OmegaConf.select(fed, 'keep_optimizer_state')!r} must be "
                        "true or false")
    if OmegaConf.select(fed, "update_norm_action") not in ("clip", "reject"):
        problems.append(f"federation.update_norm_action={OmegaConf.select(fed, 'update_norm_action')!r} must be "
                        "clip or reject")
    strategy = OmegaConf.select(fed, "strategy")
    if strategy not in STRATEGIES:
        problems.append(f"federation.strategy={strategy!r} is unknown; choose one of {sorted(STRATEGIES)}")
    if strategy == "trimmed_mean":
        fraction = _number(OmegaConf.select(fed, "trim_fraction"))
        if fraction is None or not 0 < fraction < 0.5:
            problems.append(f"federation.trim_fraction={OmegaConf.select(fed, 'trim_fraction')!r} must be in (0, 0.5): "
                            "trimmed_mean trims at least one site at each end (0 trims none: use fedavg)")
    if strategy in ROBUST_QUORUM and _number(OmegaConf.select(fed, "min_sites"), integer=True) is not None \
            and int(fed.min_sites) < ROBUST_QUORUM[strategy]:
        problems.append(f"federation.strategy={strategy} needs federation.min_sites >= {ROBUST_QUORUM[strategy]} "
                        f"(got {fed.min_sites}): with fewer sites it trims nothing and is a plain mean")
    try:
        check_transfer_dtype(OmegaConf.select(fed, "transfer_dtype"))
    except ValueError as err:
        problems.append(str(err))
    if not isinstance(OmegaConf.select(fed, "resume"), bool):
        problems.append(f"federation.resume={OmegaConf.select(fed, 'resume')!r} must be true or false")
    if (name := OmegaConf.select(fed, "run_name")) is not None and (problem := run_name_problem(name)):
        problems.append(problem)
    output_dir = OmegaConf.select(fed, "output_dir")
    if not isinstance(output_dir, str) or not output_dir.strip() or "\0" in output_dir:
        problems.append(f"federation.output_dir={output_dir!r} must be a folder path")
    registry = OmegaConf.select(fed, "registry")
    if registry is not None and (not isinstance(registry, str) or not registry.strip() or "\0" in registry):
        problems.append(f"federation.registry={registry!r} must be an SQLAlchemy URL, a file path or null")
    return problems


# ------------------------------------------------------------------------------------------ replies
@dataclass
class SiteReply:
    """One site's reply as the round uses it, after `read_reply` checked every part. `weight`, `norm` and
    `scale` are set by `server.influence.bound_influence`."""

    site: str
    node: int
    update: Params
    examples: int            # as the site claimed them
    metrics: dict[str, float]
    weight: float = 0.0      # the example weight aggregation uses (claimed, capped)
    norm: float = 0.0        # norm of the change to the global floating-point arrays, as sent
    scale: float = 1.0       # < 1 where the change was scaled down to the norm bound
    notes: list[str] = field(default_factory=list)


def _wire_dtypes(ref: np.ndarray) -> set[np.dtype]:
    """The dtypes an array may travel in: its own, or float16 for a floating one (`federation.transfer_dtype`)."""
    return {ref.dtype, np.dtype(np.float16)} if np.issubdtype(ref.dtype, np.floating) else {ref.dtype}


def _read_array(name: str, array, ref: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Deserialise one received array after checking its .npy header against the global one (a forged header
    could otherwise make numpy allocate any size); float16 is widened to the global dtype."""
    try:
        data = array.data
        if array.stype != "numpy.ndarray" or not isinstance(data, bytes):
            return None, f"{name}: not a numpy array (stype {array.stype!r})"
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        if tuple(shape) != ref.shape:
            return None, f"{name}: shape {tuple(shape)}, expected {ref.shape}"
        if dtype not in _wire_dtypes(ref):
            return None, f"{name}: dtype {dtype}, expected {ref.dtype}"
        if len(data) - stream.tell() != int(np.prod(shape)) * dtype.itemsize:
            return None, f"{name}: {len(data) - stream.tell()} data bytes for shape {tuple(shape)} {dtype}"
        value = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:   # whatever the bytes are, the reply is rejected, not the ServerApp stopped
        return None, f"{name}: unreadable array ({type(err).__name__}: {err})"
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
        return None, f"{name}: {int((~np.isfinite(value)).sum())} NaN/Inf value(s)"
    if not np.issubdtype(value.dtype, np.floating):
        # Integer arrays are not trained: step counters only grow, any other (ids, indices) stays as it was sent
        if name.rsplit(".", 1)[-1] in COUNTERS:
            if value.size and not (0 <= value.min() and value.max() <= MAX_EXAMPLES):
                return None, f"{name}: step counter outside [0, 2**53]"
        elif not np.array_equal(value, ref):
            return None, f"{name}: an integer array training never changes differs from the global one"
    return value.astype(ref.dtype) if value.dtype != ref.dtype else value, None


def read_arrays(record: ArrayRecord, reference: Params) -> tuple[Params, list[str]]:
    """(the arrays that passed, as the global dtypes; everything wrong with the record against `reference`)."""
    problems, update = [], {}
    names = list(record.keys())
    if not all(isinstance(name, str) for name in names):
        return {}, ["array names must be strings"]
    for name in sorted(set(names) & set(reference)):
        value, problem = _read_array(name, record[name], reference[name])
        if problem:
            problems.append(problem)
        else:
            update[name] = value
    missing, extra = sorted(set(reference) - set(names)), sorted(set(names) - set(reference))
    if missing:
        problems.insert(0, f"missing {len(missing)} parameter(s): {', '.join(missing[:5])}")
    if extra:
        problems.insert(0, f"unexpected {len(extra)} parameter(s): {', '.join(extra[:5])}")
    return update, problems


def _metric_problems(name, value) -> str | None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME:
        return f"metric name {str(name)[:80]!r} must be a string of 1-{MAX_METRIC_NAME} characters"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"metric {name} = {str(value)[:80]} is not one number"
    if not math.isfinite(value):
        return f"metric {name} = {value} is not finite"
    if abs(value) > METRIC_LIMIT:
        return f"metric {name} = {value:.3g} is beyond +-{METRIC_LIMIT:.0e}"
    return None


def _examples_problem(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"examples = {str(value)[:80]} is not a number"
    if not math.isfinite(value) or not float(value).is_integer() or not 1 <= value <= MAX_EXAMPLES:
        return f"examples = {value} must be a whole number in [1, 2**53]"
    return None


def site_name_problem(name) -> str | None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SITE_NAME or not name.isprintable() or not name.strip():
        return f"site name {str(name)[:80]!r} must be a printable string of 1-{MAX_SITE_NAME} characters"
    return None


def read_metrics(metrics: dict) -> tuple[int | None, dict[str, float], list[str]]:
    """(examples, the other metrics as floats, problems) of a reply's metrics."""
    problems = []
    if len(metrics) > MAX_METRICS:
        problems.append(f"{len(metrics)} metrics, at most {MAX_METRICS}")
    problems += [p for name, value in metrics.items() if name != "examples" and (p := _metric_problems(name, value))]
    if "examples" not in metrics:
        problems.append("metrics carry no `examples` (the site's weight)")
    elif problem := _examples_problem(metrics["examples"]):
        problems.append(problem)
    if problems:
        return None, {}, problems
    return int(metrics["examples"]), {k: float(v) for k, v in metrics.items() if k != "examples"}, []


def read_reply(reply: Message, node: int, reference: Params) -> tuple[SiteReply | None, str, list[str]]:
    """(the checked reply or None, a label for the record: the site name when readable, problems)."""
    label = f"node {node}"
    src = getattr(reply.metadata, "src_node_id", node)
    if src != node:
        return None, label, [f"reply from node {src} to the round sent to node {node}"]
    content = reply.content
    if not isinstance(content, RecordDict):
        return None, label, [f"content is a {type(content).__name__}, not a RecordDict"]
    problems = [f"unexpected record {str(name)[:80]!r}" for name in content if name not in REPLY_RECORDS]
    for name, kind in REPLY_RECORDS.items():
        if name not in content:
            problems.append(f"missing record {name!r}")
        elif not isinstance(content[name], kind):
            problems.append(f"record {name!r} is a {type(content[name]).__name__}, expected {kind.__name__}")
    if problems:
        return None, label, problems
    site = dict(content["site"])
    if set(site) != {"name"}:
        return None, label, [f"site record holds {sorted(map(str, site))[:5]}, expected one `name`"]
    if problem := site_name_problem(site["name"]):
        return None, label, [problem]
    name = label = site["name"]
    examples, metrics, problems = read_metrics(dict(content["metrics"]))
    update, array_problems = read_arrays(content["arrays"], reference)
    problems += array_problems
    if problems:
        return None, label, problems
    return SiteReply(name, node, update, examples, metrics), label, []


# ------------------------------------------------------------------------------------------ site names
class SiteNames:
    """Each site name belongs to the first node that claimed it in the run, and each node to one name; kept in the
    registry (table `site_nodes`), so a resumed run keeps who is who. Also remembers the examples each site
    declared at its first claim (the base of `federation.examples_growth_factor`).

    `node_ids_per_run`: the nodes get new ids whenever the Flower run restarts (the simulation runtime's virtual
    SuperNodes; see server/app.py:node_ids_per_run). The bindings stored by earlier Flower runs of this run name
    then name ids that no longer exist, so each name is bound afresh at its first claim in this Flower run, with
    the same rules within it; each site's first declared examples are kept from the run's very first claim."""

    def __init__(self, registry, run: str, node_ids_per_run: bool = False):
        self.registry, self.run = registry, run
        rows = registry.site_nodes(run)   # in order of claim: a rebinding repeats the site's first examples
        self.node_of = {} if node_ids_per_run else {row["site"]: int(row["node_id"]) for row in rows}
        self.first_examples = {row["site"]: int(row["examples"]) for row in rows}

    def claim(self, round_: int, site: str, node: int, examples: int) -> str | None:
        """Bind `site` to `node` at its first claim; the reason to refuse the reply when the claim conflicts."""
        owner = self.node_of.get(site)
        if owner is not None and owner != node:
            return f"site name {site!r} belongs to node {owner} in this run; node {node} claimed it"
        if owner is None:
            taken = next((name for name, n in self.node_of.items() if n == node), None)
            if taken is not None:
                return f"node {node} is site {taken!r} in this run; it now claimed {site!r}"
            first = self.first_examples.setdefault(site, examples)
            self.registry.add_site_node(self.run, round_, site, node, first)
            self.node_of[site] = node
        return None
