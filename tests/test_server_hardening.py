"""The ServerApp's trust boundary, through its round loop with crafted replies: malformed replies refused and
recorded while the round goes on, site names bound to nodes, bounded influence for every strategy, the run config
refused before round 1. Tiny numpy arrays and a stubbed model: no training, no Flower runtime."""
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

import server.app
from server.aggregation import coordinate_median, trimmed_mean
from server.app import Federation
from server.checkpoints import load_latest_valid
from server.influence import Bounds, bound_influence
from server.validation import RunConfigError, SiteReply
from shared_models.config import RenamedKeyError, compose
from shared_models.transfer import contiguous

K = 4.0   # federation.update_norm_factor's default: the bound the poisoning tests state
GLOBAL = {"enc.weight": np.zeros((4, 3), np.float32), "enc.bias": np.zeros(3, np.float32),
          "bn.running_var": np.ones(3, np.float32), "bn.num_batches_tracked": np.array(5, np.int64)}


def honest(seed: int, base: dict | None = None) -> dict[str, np.ndarray]:
    """A plausible update: `base` (the global arrays) moved by ~0.3 per coordinate, the step counter advanced."""
    rng, base = np.random.default_rng(seed), GLOBAL if base is None else base
    update = {k: (v + rng.normal(0, 0.3, v.shape)).astype(v.dtype) for k, v in base.items() if v.dtype != np.int64}
    return update | {"bn.num_batches_tracked": np.array(7, np.int64)}


def content(arrays=None, site="A", examples=100.0, metrics=None, drop=()) -> RecordDict:
    """A reply as client/app.py builds it, less the records in `drop`."""
    arrays = honest(0) if arrays is None else arrays
    parts = {"arrays": ArrayRecord({k: Array(contiguous(v)) for k, v in arrays.items()}),
             "metrics": MetricRecord({"loss": 1.0, "steps": 2.0, **(metrics or {}), "examples": examples}),
             "site": ConfigRecord({"name": site})}
    return RecordDict({k: v for k, v in parts.items() if k not in drop})


def reply_from(node: int, body: RecordDict, src: int | None = None) -> Message:
    metadata = Metadata(run_id=1, message_id=f"from-{node}", src_node_id=node if src is None else src, dst_node_id=0,
                        reply_to_message_id=f"to-{node}", group_id="1", created_at=0.0, ttl=60.0,
                        message_type=MessageType.TRAIN)
    return Message(metadata=metadata, content=body)


class ReplyGrid:
    """A SuperLink stand-in: `replies[node]()`, or `replies[node](sent arrays)` for a `Replying` one, is the content
    node sends back to each round's message."""

    def __init__(self, replies: dict, src: dict | None = None):
        self.replies, self.src, self.asked = replies, src or {}, []

    def get_node_ids(self):
        return sorted(self.replies)

    def push_messages(self, messages):
        self.asked += [m.metadata.dst_node_id for m in messages]
        self.sent = {k: a.numpy() for k, a in messages[0].content["arrays"].items()} if messages else {}
        return [f"to-{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, ids):
        def body(node):
            make = self.replies[node]
            return make(self.sent) if isinstance(make, Replying) else make()
        # replies arrive in the order `replies` lists the nodes (the first claim of a name wins)
        order = list(self.replies)
        nodes = sorted((int(i[3:]) for i in ids), key=order.index)
        return [reply_from(node, body(node), self.src.get(node)) for node in nodes]


class Replying:
    """A reply built from the arrays the round sent (cyclic: the model as the previous site left it)."""

    def __init__(self, make):
        self.make = make

    def __call__(self, sent):
        return self.make(sent)


@pytest.fixture
def federation(tmp_path, monkeypatch):
    """Federation(grid, overrides) with the registry started, the model stubbed (only its tokenizer is read)."""
    monkeypatch.setattr(server.app, "initial_model", lambda cfg: SimpleNamespace(tokenizer=None))
    monkeypatch.setattr(server.app, "checkpoint_fingerprints", lambda cfg, tokenizer: {"model": "m", "objective": "o"})
    monkeypatch.setattr(server.app, "Message", lambda body, dst_node_id, **_: SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=dst_node_id), content=body))

    def make(grid, *overrides, name="r", start=True, node_ids_per_run=False):
        cfg = compose([f"federation.output_dir={tmp_path}", f"federation.run_name={name}", "federation.poll_s=0.01",
                       "federation.wait_for_sites_s=1", "federation.rounds=6", *overrides])
        fed = Federation(grid, cfg, node_ids_per_run=node_ids_per_run)
        if start:
            fed.registry.start_run(name, None, 6, {}, "hash")
        return fed

    return make


def _norm(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2))
                         for k in a if np.issubdtype(a[k].dtype, np.floating)))


def with_raw_bias(body: RecordDict, data: bytes) -> RecordDict:
    """`body` whose enc.bias array is the given bytes, whatever its declared dtype and shape say."""
    body["arrays"]["enc.bias"] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=data)
    return body


def _npy_header_only(shape) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return stream.getvalue() + b"\0" * 48


# ------------------------------------------------------------------------------------------ malformed replies
MALFORMED = {
    11: (lambda: content(drop=("arrays",)), "missing record 'arrays'"),
    12: (lambda: content(drop=("metrics",)), "missing record 'metrics'"),
    13: (lambda: content(drop=("site",)), "missing record 'site'"),
    14: (lambda: RecordDict({**content(site="E", drop=("arrays",)), "arrays": ConfigRecord({"x": 1})}),
         "record 'arrays' is a ConfigRecord, expected ArrayRecord"),
    15: (lambda: content(site="F", examples=math.inf), "examples = inf must be a whole number"),
    16: (lambda: content(site="G", examples=math.nan), "examples = nan must be a whole number"),
    17: (lambda: content(site="H", examples=2.5), "examples = 2.5 must be a whole number"),
    18: (lambda: content(site="I", examples=-5.0), "examples = -5.0 must be a whole number"),
    19: (lambda: RecordDict({"arrays": content()["arrays"], "metrics": MetricRecord({"loss": 1.0}),
                             "site": ConfigRecord({"name": "J"})}), "metrics carry no `examples`"),
    20: (lambda: content(site=42), "site name '42' must be a printable string"),
    21: (lambda: content(site="K", arrays=honest(1) | {"extra": np.zeros(2, np.float32)}), "unexpected 1 parameter(s): extra"),
    22: (lambda: content(site="L", arrays={k: v for k, v in honest(1).items() if k != "enc.bias"}),
         "missing 1 parameter(s): enc.bias"),
    23: (lambda: content(site="M", arrays=honest(1) | {"enc.bias": np.zeros(4, np.float32)}), "enc.bias: shape (4,), expected (3,)"),
    24: (lambda: content(site="N", arrays=honest(1) | {"enc.bias": np.zeros(3, np.float64)}), "enc.bias: dtype float64"),
    25: (lambda: content(site="O", arrays=honest(1) | {"enc.bias": np.array([0, np.nan, np.inf], np.float32)}),
         "enc.bias: 2 NaN/Inf value(s)"),
    26: (lambda: content(site="P", metrics={"loss": math.nan}), "metric loss = nan is not finite"),
    27: (lambda: content(site="Q", metrics={"loss": 1e300}), "metric loss = 1e+300 is beyond"),
    28: (lambda: content(site="R", metrics={"loss": [1.0, 2.0]}), "metric loss = [1.0, 2.0] is not one number"),
    29: (lambda: RecordDict({**content(site="S"), "extra": ConfigRecord({"x": 1})}), "unexpected record 'extra'"),
    # a forged .npy header claiming 10^12 floats: refused from the header, nothing allocated
    30: (lambda: with_raw_bias(content(site="T"), _npy_header_only((10**12,))),
         "enc.bias: shape (1000000000000,), expected (3,)"),
    31: (lambda: with_raw_bias(content(site="U"), b"garbage"), "enc.bias: unreadable array"),
    32: (lambda: content(site="W", arrays=honest(1) | {"bn.num_batches_tracked": np.array(2**62)}),
         "bn.num_batches_tracked: step counter outside [0, 2**53]"),
}


def test_each_malformed_reply_is_refused_and_recorded_and_the_round_goes_on(federation):
    replies = {node: (lambda node=node: content(honest(node), site=f"honest{node}")) for node in (1, 2, 3)}
    replies |= {node: make for node, (make, _) in MALFORMED.items()}
    replies[40] = lambda: content(honest(40), site="V")   # answers the round sent to node 40 as node 41
    fed = federation(ReplyGrid(replies, src={40: 41}), "federation.min_sites=3")
    params = fed.round(1, GLOBAL)

    shown = fed.registry.describe("r")
    assert [(r["status"], r["sites_asked"], r["sites_accepted"]) for r in shown["rounds"]] == [("complete", len(replies), 3)]
    problems = {int(r["node_id"]): " | ".join(r["problems"]) for r in shown["rejections"]}
    assert set(problems) == set(MALFORMED) | {40}
    for node, (_, reason) in MALFORMED.items():
        assert reason in problems[node], (node, problems[node])
    assert "reply from node 41 to the round sent to node 40" in problems[40]
    assert {m["site"] for m in shown["site_metrics"]} == {"honest1", "honest2", "honest3"}
    expected = {k: np.mean([honest(n)[k].astype(np.float64) for n in (1, 2, 3)], axis=0) for k in GLOBAL}
    for name in ("enc.weight", "enc.bias", "bn.running_var"):
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-5)
    assert load_latest_valid(fed.run_dir).round == 1


def test_the_round_takes_the_sites_in_name_order_whatever_order_their_replies_arrive_in(federation):
    """A seeded run repeats only if the aggregate's floating-point sum does: replies arrive as sites finish."""
    make = {1: lambda: content(honest(1), site="A", examples=100.0), 2: lambda: content(honest(2), site="B", examples=300.0),
            3: lambda: content(honest(3), site="C", examples=200.0)}
    rounds = []
    for order in ((1, 2, 3), (3, 1, 2), (2, 3, 1)):
        name = "r" + "".join(map(str, order))
        accepted = federation(ReplyGrid({}), name=f"{name}_accept").trust.accept(
            1, GLOBAL, [(node, reply_from(node, make[node]())) for node in order])
        assert [(reply.site, reply.node) for reply in accepted] == [("A", 1), ("B", 2), ("C", 3)]
        fed = federation(ReplyGrid({node: make[node] for node in order}), name=name)
        rounds.append((fed.round(1, GLOBAL), [m["site"] for m in fed.registry.describe(name)["site_metrics"]]))
    for params, sites in rounds:
        assert sites == ["A", "B", "C"]
        for key in GLOBAL:
            assert np.array_equal(params[key], rounds[0][0][key])
    expected = np.tensordot(np.array([1, 3, 2]) / 6, np.stack([honest(n)["enc.weight"] for n in (1, 2, 3)]), axes=1)
    np.testing.assert_allclose(rounds[0][0]["enc.weight"], expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------ site names
def test_a_second_node_claiming_a_site_name_is_refused_and_the_binding_survives_a_resume(federation):
    replies = {1: lambda: content(honest(1), site="A"), 2: lambda: content(honest(2), site="B"),
               9: lambda: content(honest(9), site="A")}
    fed = federation(ReplyGrid(replies))
    params = fed.round(1, GLOBAL)
    shown = fed.registry.describe("r")
    assert [(r["site"], r["node_id"]) for r in shown["site_metrics"]] == [("A", "1"), ("B", "2")]
    assert [(r["site"], r["node_id"]) for r in shown["rejections"]] == [("A", "9")]
    assert "site name 'A' belongs to node 1 in this run; node 9 claimed it" in shown["rejections"][0]["problems"][0]
    assert [(r["site"], r["node_id"]) for r in shown["site_nodes"]] == [("A", "1"), ("B", "2")]

    # the coordinator restarts: node 9 answers first now, and node 2 claims a second name
    replies = {9: lambda: content(honest(9), site="A"), 1: lambda: content(honest(1), site="A"),
               2: lambda: content(honest(2), site="C"), 3: lambda: content(honest(3), site="D")}
    resumed = federation(ReplyGrid(replies), "federation.resume=true", start=False)
    assert resumed._starting_point()[0] == 2
    resumed.registry.start_run("r", None, 6, {}, "hash")
    resumed.round(2, params)
    shown = resumed.registry.describe("r")
    assert {(r["site"], r["node_id"]) for r in shown["site_metrics"] if r["round"] == 2} == {("A", "1"), ("D", "3")}
    refused = {r["node_id"]: r["problems"][0] for r in shown["rejections"] if r["round"] == 2}
    assert "belongs to node 1" in refused["9"] and "node 2 is site 'B' in this run; it now claimed 'C'" in refused["2"]


def test_a_resumed_simulation_rebinds_names_to_its_new_node_ids_and_a_deployment_does_not(federation):
    from flwr.superlink.grid import InMemoryGrid

    assert server.app.node_ids_per_run(InMemoryGrid.__new__(InMemoryGrid))   # Flower's simulation runtime's grid
    assert not server.app.node_ids_per_run(ReplyGrid({}))                    # anything else: a SuperLink's nodes

    def first_run(name: str, per_run: bool) -> dict:
        fed = federation(ReplyGrid({1: lambda: content(honest(1), site="A"), 2: lambda: content(honest(2), site="B")}),
                         name=name, node_ids_per_run=per_run)
        return fed.round(1, GLOBAL)

    # The restarted Flower run's nodes all have new ids; A now claims 10 x the 100 examples it declared first, and
    # node 13 claims B's name after node 12 did.
    restarted = {11: lambda: content(honest(11), site="A", examples=1000.0),
                 12: lambda: content(honest(12), site="B"), 13: lambda: content(honest(13), site="B"),
                 14: lambda: content(honest(14), site="C")}

    def resumed(name: str, per_run: bool) -> dict:
        fed = federation(ReplyGrid(restarted), "federation.resume=true", "federation.min_sites=1", name=name,
                         start=False, node_ids_per_run=per_run)
        assert fed._starting_point()[0] == 2
        fed.registry.start_run(name, None, 6, {}, "hash")
        fed.round(2, params)
        shown = fed.registry.describe(name)
        return ({r["site"]: r["node_id"] for r in shown["site_metrics"] if r["round"] == 2},
                {r["node_id"]: r["problems"][0] for r in shown["rejections"] if r["round"] == 2}, shown, fed)

    # deployment: the stored bindings hold, only the new name C is taken
    params = first_run("deployment", per_run=False)
    accepted, refused, _, _ = resumed("deployment", per_run=False)
    assert accepted == {"C": "14"} and set(refused) == {"11", "12", "13"}
    assert "site name 'A' belongs to node 1 in this run; node 11 claimed it" in refused["11"]
    assert "belongs to node 2" in refused["12"] and "belongs to node 2" in refused["13"]

    # simulation: each name is bound afresh at its first claim in the new Flower run, with the same rules in it
    params = first_run("simulation", per_run=True)
    accepted, refused, shown, fed = resumed("simulation", per_run=True)
    assert accepted == {"A": "11", "B": "12", "C": "14"} and set(refused) == {"13"}
    assert "site name 'B' belongs to node 12 in this run; node 13 claimed it" in refused["13"]
    names = fed.trust.site_names
    assert names.claim(3, "D", 12, 100) == "node 12 is site 'B' in this run; it now claimed 'D'"
    # A's weight is still capped by the 100 examples it declared in round 1 (examples_growth_factor 2)
    assert load_latest_valid(fed.run_dir).meta["influence"]["A"]["weight"] == 200 and names.first_examples["A"] == 100
    assert [(r["round"], r["site"], r["node_id"], r["examples"]) for r in shown["site_nodes"]] == [
        (1, "A", "1", 100), (1, "B", "2", 100), (2, "A", "11", 100), (2, "B", "12", 100), (2, "C", "14", 100)]


# ------------------------------------------------------------------------------------------ bounded influence
STRATEGIES = ["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "median", "trimmed_mean"]


def _poisoned_round(federation, strategy, *overrides):
    """Round 1 with 4 honest sites, one sending 1e30 everywhere and one claiming 1e15 examples for an update 40
    times an honest one; the same strategy on the honest sites alone, from a fresh server state."""
    honest_replies = {n: (lambda n=n: content(honest(n), site=f"h{n}")) for n in (1, 2, 3, 4)}
    poison = {k: np.full_like(v, 1e30) if v.dtype != np.int64 else np.array(7, np.int64) for k, v in GLOBAL.items()}
    heavy = {k: (GLOBAL[k] + 40 * (v - GLOBAL[k])).astype(v.dtype) if v.dtype != np.int64 else v for k, v in honest(5).items()}
    attacked = honest_replies | {5: lambda: content(poison, site="x"), 6: lambda: content(heavy, site="y", examples=1e15)}
    common = [f"federation.strategy={strategy}", "federation.min_sites=3", *overrides]
    got = federation(ReplyGrid(attacked), *common, name=f"{strategy}_attacked").round(1, GLOBAL)
    clean = federation(ReplyGrid(honest_replies), *common, name=f"{strategy}_clean").round(1, GLOBAL)
    honest_norm = float(np.median([_norm(honest(n), GLOBAL) for n in (1, 2, 3, 4)]))
    return got, clean, honest_norm


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_poisoned_and_one_overweighted_site_move_the_model_at_most_k_plus_1_honest_norms(federation, strategy):
    got, clean, honest_norm = _poisoned_round(federation, strategy)
    assert all(np.isfinite(v).all() for v in got.values())
    # each update is held to K x the round's median norm (an honest one), so a mean moves at most (K + 1) honest norms
    assert _norm(got, clean) <= (K + 1) * honest_norm, (_norm(got, clean), honest_norm)


def test_without_the_bounds_fedavg_is_taken_over(federation):
    """The control: the same attack with every bound off moves FedAvg's model by ~1e30 (what the tests above stop)."""
    got, clean, honest_norm = _poisoned_round(federation, "fedavg", "federation.update_norm_factor=null",
                                              "federation.examples_weight_factor=null")
    assert not np.isfinite(_norm(got, clean)) or _norm(got, clean) > 1e10 * honest_norm


def test_reject_action_leaves_the_large_update_out_and_records_why(federation):
    replies = {n: (lambda n=n: content(honest(n), site=f"h{n}")) for n in (1, 2, 3)}
    replies[4] = lambda: content({k: np.full_like(v, 1e30) if v.dtype != np.int64 else v for k, v in GLOBAL.items()}, site="x")
    fed = federation(ReplyGrid(replies), "federation.update_norm_action=reject")
    fed.round(1, GLOBAL)
    shown = fed.registry.describe("r")
    assert [(r["site"], r["node_id"]) for r in shown["rejections"]] == [("x", "4")]
    assert "update norm 4.24e+30 above the bound" in shown["rejections"][0]["problems"][0]
    assert shown["rounds"][0]["sites_accepted"] == 3


def test_cyclic_holds_a_single_update_to_the_absolute_bound_and_to_the_last_rounds_norms(federation):
    poison = {k: np.full_like(v, 1e30) if v.dtype != np.int64 else v for k, v in GLOBAL.items()}
    replies = {1: lambda: content(poison, site="x"), 2: Replying(lambda sent: content(honest(2, sent), site="b")),
               3: Replying(lambda sent: content(honest(3, sent), site="c")), 4: lambda: content(poison, site="x2")}
    fed = federation(ReplyGrid(replies), "federation.strategy=cyclic", "federation.max_update_norm=10")
    params = fed.round(1, GLOBAL)                 # no history yet: only max_update_norm holds it
    assert _norm(params, GLOBAL) == pytest.approx(10, rel=1e-4)
    params = fed.round(2, params)
    params = fed.round(3, params)
    before = params
    params = fed.round(4, params)                 # history: 10, ~|honest|, ~|honest|: median ~1.3, not 10
    history_median = sorted(fed.trust.norm_history[:3])[1]
    assert _norm(params, before) == pytest.approx(K * history_median, rel=1e-4) and K * history_median < 10
    meta = load_latest_valid(fed.run_dir).meta
    assert meta["influence"]["x2"]["scale"] < 1e-28 and len(meta["update_norms"]) == 4
    assert "scaled to" in meta["influence"]["x2"]["notes"][0]


def test_a_site_weight_is_capped_by_its_first_claim_and_the_rounds_median():
    bounds = Bounds(examples_growth_factor=2.0, examples_weight_factor=10.0, max_examples_weight=5000)
    replies = [SiteReply(s, i, dict(GLOBAL), n, {}) for i, (s, n) in enumerate([("a", 100), ("b", 100), ("c", 900),
                                                                                 ("d", 10**15)])]
    kept, rejected = bound_influence(GLOBAL, replies, [], bounds, {"a": 100, "c": 300})
    # c: 2 x its first 300; d: 5000 absolute, then 10 x the median weight (100)
    assert not rejected and [r.weight for r in kept] == [100, 100, 600, 1000]
    assert "2 x the 300 examples it declared first" in kept[2].notes[0]


def test_secagg_sites_are_checked_and_the_mean_they_leave_is_bounded(federation, monkeypatch):
    """Under SecAgg+ the server sees one mean: each site's name and metrics are still checked and recorded, and the
    mean is held to max_update_norm (a site's masked share cannot be taken out of it)."""
    from server.secagg import SecureRound, SecureSite

    mean_delta = {k: np.full(v.shape, 1e30, np.float64) for k, v in GLOBAL.items() if v.dtype != np.int64}
    sites = [(1, 100, {"site": "A", "loss": 1.0}), (2, 120, {"site": "B", "loss": 2.0}),
             (3, 100, {"site": "A", "loss": 1.0}), (4, 100, {"site": "D", "loss": math.nan})]
    monkeypatch.setattr(server.app, "secure_round", lambda *args: SecureRound(mean_delta, [SecureSite(n, e, dict(m)) for n, e, m in sites]))
    fed = federation(ReplyGrid({n: None for n in (1, 2, 3, 4)}), "privacy=secagg", "federation.max_update_norm=2")
    params = fed.round(1, GLOBAL)
    assert _norm(params, GLOBAL) == pytest.approx(2, rel=1e-4)
    shown = fed.registry.describe("r")
    assert [(r["site"], r["node_id"]) for r in shown["site_metrics"]] == [("A", "1"), ("B", "2")]
    refused = {r["node_id"]: " ".join(r["problems"]) for r in shown["rejections"]}
    assert "belongs to node 1" in refused["3"] and "metric loss = nan is not finite" in refused["4"]


def test_the_server_app_refuses_a_bad_config_with_one_error_line(caplog, monkeypatch):
    monkeypatch.setattr(server.app.logging, "basicConfig", lambda **_: None)   # keep pytest's log capture
    context = SimpleNamespace(run_config={"overrides": "train.lr=nan federation.run_name=/abs"}, run_id=7)
    with pytest.raises(RunConfigError) as refused:
        server.app.main(None, context)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "train.lr=nan" in errors[0] and "federation.run_name='/abs'" in errors[0]


@pytest.mark.parametrize("override, new", [("+federation.validate_updates=true", "federation.update_norm_action"),
                                           ("federation.validate_updates=false", "federation.update_norm_action"),
                                           ("federation.batch_size=8", "train.batch_size"),
                                           ("federation.lr=0.001", "train.lr"),
                                           ("partition.strategy=iid", "partition.name")])
def test_a_retired_key_is_refused_with_the_key_to_use(caplog, monkeypatch, override, new):
    monkeypatch.setattr(server.app.logging, "basicConfig", lambda **_: None)   # keep pytest's log capture
    with pytest.raises(RenamedKeyError, match=f"use {new}"):
        compose([override])
    old = override.lstrip("+").split("=")[0]
    context = SimpleNamespace(run_config={"overrides": f"privacy=secagg {override}"}, run_id=7)
    with pytest.raises(RunConfigError, match=f"{old} is no longer a setting"):
        server.app.main(None, context)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and new in errors[0]


# ------------------------------------------------------------------------------------------ robust rules' quorum
def test_trimmed_mean_trims_at_least_one_site_per_side_with_3_or_4_sites(federation):
    assert trimmed_mean([({"w": np.array([v])}, 1) for v in (0.0, 1.0, 100.0)], 0.2)["w"][0] == 1.0
    assert trimmed_mean([({"w": np.array([v])}, 1) for v in (-50.0, 1.0, 2.0, 100.0)], 0.2)["w"][0] == 1.5
    # through the round, with the norm bound off: trimming alone keeps the 1e30 site out
    replies = {n: (lambda n=n: content(honest(n), site=f"h{n}")) for n in (1, 2, 3)}
    replies[4] = lambda: content({k: np.full_like(v, 1e30) if v.dtype != np.int64 else v for k, v in GLOBAL.items()}, site="x")
    got = federation(ReplyGrid(replies), "federation.strategy=trimmed_mean", "federation.min_sites=3",
                     "federation.update_norm_factor=null").round(1, GLOBAL)
    assert np.abs(got["enc.weight"]).max() < 2


def test_median_refuses_fewer_than_3_sites(federation):
    with pytest.raises(ValueError, match="median needs at least 3 updates, got 2"):
        coordinate_median([({"w": np.zeros(1)}, 1), ({"w": np.ones(1)}, 1)])
    with pytest.raises(RunConfigError, match="strategy=median needs federation.min_sites >= 3"):
        federation(None, "federation.strategy=median", "federation.min_sites=2")
    # 3 sites asked, one reply malformed: the round is refused, not averaged
    replies = {1: lambda: content(honest(1), site="a"), 2: lambda: content(honest(2), site="b"),
               3: lambda: content(site="c", examples=math.nan)}
    fed = federation(ReplyGrid(replies), "federation.strategy=median", "federation.min_sites=3")
    with pytest.raises(RuntimeError, match="2 accepted update"):
        fed.round(1, GLOBAL)
    assert fed.registry.describe("r")["rounds"][0]["status"] == "too_few_sites"


# ------------------------------------------------------------------------------------------ run config
@pytest.mark.parametrize("override, named", [
    ("train.lr=nan", "train.lr=nan must be a finite number > 0"),
    ("train.lr=-1", "train.lr=-1 must be a finite number > 0"),
    ("train.lr=11", "train.lr=11 must be a finite number > 0 and <= 10"),
    ("train.batch_size=-1", "train.batch_size=-1 must be an integer >= 1"),
    ("federation.local_steps=0", "federation.local_steps=0 must be an integer >= 1"),
    ("federation.rounds=0", "federation.rounds=0 must be an integer >= 1"),
    ("federation.run_name=../x", "federation.run_name='../x' must be 1-64 letters"),
    ("federation.run_name=..", "federation.run_name='..' must be 1-64 letters"),
    ("federation.strategy=krum", "federation.strategy='krum' is unknown"),
    ("federation.trim_fraction=0", None),   # only refused with trimmed_mean
    ("federation.update_norm_action=scale", "update_norm_action='scale' must be clip or reject"),
    ("federation.max_update_norm=-1", "max_update_norm=-1 must be a finite number > 0"),
])
def test_the_run_config_is_refused_before_round_1_in_one_message(tmp_path, override, named):
    from server.app import check_supported

    cfg = compose([override, f"federation.output_dir={tmp_path}"])
    if named is None:
        check_supported(cfg)
        return
    with pytest.raises(RunConfigError, match="refused before round 1") as refused:
        Federation(None, cfg)
    assert named in str(refused.value)
    assert not list(tmp_path.iterdir()), "a refused run writes nothing"


def test_every_problem_is_named_at_once():
    with pytest.raises(RunConfigError) as refused:
        server.app.check_supported(compose(["train.lr=nan", "train.batch_size=-1", "federation.local_steps=0",
                                            "federation.run_name=../x"]))
    assert str(refused.value).count("\n  - ") == 4


# ------------------------------------------------------------------------------------------ Flower's own loop
@pytest.mark.parametrize("strategy", ["fedadam", "trimmed_mean"])
def test_a_strategy_gives_the_same_model_in_flowers_own_loop(strategy, monkeypatch):
    """The ServerApp calls `aggregate_updates` on checked replies; Flower's `Strategy.start` sends Messages and
    calls `aggregate_train`: the same rule gives the same model there (FedAdam's moments carrying across rounds)."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.strategy import Update, strategy_from_config

    for key, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():   # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, key, value)

    fed = compose([f"federation.strategy={strategy}", "federation.min_sites=3"]).federation
    ours, flowers = strategy_from_config(fed), strategy_from_config(fed)

    class MessageGrid:   # each node n answers the arrays it is sent moved by honest(n), weighted 100 n
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, timeout):
            def answer(message):
                node, sent = message.metadata.dst_node_id, {k: a.numpy() for k, a in message.content["arrays"].items()}
                return reply_from(node, content(honest(node, sent), site=f"s{node}", examples=100.0 * node))
            return [answer(m) for m in messages]

    result = flowers.start(MessageGrid(), ArrayRecord({k: Array(contiguous(v)) for k, v in GLOBAL.items()}),
                           num_rounds=2)
    params = GLOBAL
    for _ in range(2):
        params = ours.aggregate_updates(params, [Update(honest(n, params), 100.0 * n) for n in (1, 2, 3)])
    assert not np.allclose(params["enc.weight"], GLOBAL["enc.weight"])
    for name, value in params.items():
        np.testing.assert_allclose(result.arrays[name].numpy(), value, rtol=1e-6)   # nodes come back in any order


def test_a_resumed_fedadam_run_steps_as_an_uninterrupted_one(federation):
    """The server optimizer's moments go into each checkpoint and come back on resume: round 2 after a restart
    gives the model an uninterrupted run gives."""
    def sites():   # honest() draws per array in the order it is given: GLOBAL's, whatever order the round sent
        return ReplyGrid({n: Replying(lambda sent, n=n: content(honest(n, {k: sent[k] for k in GLOBAL}), site=f"s{n}"))
                          for n in (1, 2, 3)})

    straight = federation(sites(), "federation.strategy=fedadam", name="straight")
    expected = straight.round(2, straight.round(1, GLOBAL))
    interrupted = federation(sites(), "federation.strategy=fedadam", name="interrupted")
    interrupted.round(1, GLOBAL)
    resumed = federation(sites(), "federation.strategy=fedadam", "federation.resume=true", name="interrupted",
                         start=False)
    start, params = resumed._starting_point()
    assert start == 2 and resumed.strategy.optimizer.steps == 1
    resumed.registry.start_run("interrupted", None, 6, {}, "hash")
    got = resumed.round(2, params)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
