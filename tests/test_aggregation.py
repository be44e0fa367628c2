"""Aggregators, update validation, checkpoints, registry, sharing rule, privacy caps, fingerprints (no Flower runtime)."""
import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from omegaconf import OmegaConf

from client.federated import (FingerprintMismatch, check_fingerprints, run_settings, shared_arrays,
                              site_dataset, train_round)
from client.site import SiteConfigError, effective_caps, validate_caps
from server.aggregation import ServerOptimizer, coordinate_median, trimmed_mean, weighted_mean
from server.central_dp import dp_fedavg
from server.checkpoints import load_latest_valid, save_round
from server.registry import Registry
from server.rounds import hybridmed_stage, round_config
from server.runs import main as runs_main
from server.strategy import strategy_from_config
from server.validation import read_arrays
from shared_models.checkpoint import checkpoint_fingerprints
from shared_models.config import compose
from shared_models.factory import create_model
from shared_models.sharing import shared_parameter_names, sharing_settings
from shared_models.transfer import contiguous
from simulations.deployment import phantom_site_fields


def _updates(*pairs):
    return [({"w": np.asarray(w, dtype=np.float32)}, n) for w, n in pairs]


def test_weighted_mean_weights_by_examples():
    out = weighted_mean(_updates(([1.0, 2.0], 1), ([4.0, 8.0], 3)))
    np.testing.assert_allclose(out["w"], [(1 * 1 + 4 * 3) / 4, (2 * 1 + 8 * 3) / 4])
    assert out["w"].dtype == np.float32


def test_weighted_mean_rounds_step_counters_instead_of_truncating():
    # these weights give a float64 mean of 6.999999999999999 for three sevens
    counters = [({"n": np.array(7, np.int64)}, w) for w in (100, 300, 200)]
    out = weighted_mean(counters)["n"]
    assert out.dtype == np.int64 and int(out) == 7


def test_median_and_trimmed_mean_ignore_an_outlier():
    updates = _updates(([1.0], 10), ([2.0], 1), ([3.0], 1), ([4.0], 1), ([1000.0], 1))
    assert coordinate_median(updates)["w"][0] == 3.0
    # 20 % of 5 sites = 1 cut at each end: mean of 2, 3, 4
    assert trimmed_mean(updates, 0.2)["w"][0] == pytest.approx(3.0)
    assert weighted_mean(updates)["w"][0] > 60  # plain FedAvg is dragged by the outlier
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(updates, 0.5)


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_server_optimizer_first_step_by_hand(kind):
    opt = ServerOptimizer(kind, lr=0.5, beta1=0.9, beta2=0.99, tau=0.01)
    out = opt.step({"w": np.zeros(1, np.float32)}, {"w": np.full(1, 2.0, np.float32)})
    delta, tau = 2.0, 0.01
    m = 0.1 * delta
    v = 0.99 * tau**2 + 0.01 * delta**2 if kind == "adam" else tau**2 + 0.01 * delta**2  # sign(tau^2 - 4) = -1
    assert out["w"][0] == pytest.approx(0.5 * m / (math.sqrt(v) + tau), rel=1e-6)


def test_yogi_and_adam_differ_once_v_exceeds_delta_squared():
    args = dict(lr=0.1, beta1=0.0, beta2=0.5, tau=1e-3)
    adam, yogi = ServerOptimizer("adam", **args), ServerOptimizer("yogi", **args)
    g = {"w": np.zeros(1)}
    for delta in (10.0, 0.1):
        a = adam.step(g, {"w": g["w"] + delta})
        y = yogi.step(g, {"w": g["w"] + delta})
    # Adam decays v geometrically toward delta^2; Yogi moves it by (1-beta2)*delta^2 only
    v1_adam, v1_yogi = 0.5 * 1e-6 + 0.5 * 100, 1e-6 + 0.5 * 100
    assert adam.v["w"][0] == pytest.approx(0.5 * v1_adam + 0.5 * 0.01)
    assert yogi.v["w"][0] == pytest.approx(v1_yogi - 0.5 * 0.01)
    assert not np.allclose(a["w"], y["w"])


def test_server_optimizer_state_survives_a_checkpoint():
    global_params = {"w": np.zeros(3, np.float32)}
    straight = ServerOptimizer("adam")
    resumed = ServerOptimizer("adam")
    for target in (1.0, 3.0):
        expected = straight.step(global_params, {"w": np.full(3, target, np.float32)})
    resumed.step(global_params, {"w": np.full(3, 1.0, np.float32)})
    restored = ServerOptimizer("adam")
    restored.load_state_dict(resumed.state_dict())
    np.testing.assert_array_equal(restored.step(global_params, {"w": np.full(3, 3.0, np.float32)})["w"], expected["w"])
    assert restored.steps == 2


def test_strategy_from_config_rejects_unknown_strategy():
    fed = OmegaConf.create({"strategy": "fedsgd", "trim_fraction": 0.2})
    with pytest.raises(ValueError, match="fedsgd.*fedavg"):
        strategy_from_config(fed)


def test_read_arrays_names_every_problem():
    reference = {"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32), "c": np.zeros(1, np.float32)}

    def record(arrays):
        return ArrayRecord({k: Array(contiguous(v)) for k, v in arrays.items()})

    _, problems = read_arrays(record({"a": np.array([[0, np.nan], [np.inf, 0]], np.float32), "b": np.zeros(4, np.float32),
                                      "x": np.zeros(1, np.float32)}), reference)
    text = "\n".join(problems)
    assert "missing 1 parameter(s): c" in text
    assert "unexpected 1 parameter(s): x" in text
    assert "b: shape (4,), expected (3,)" in text
    assert "a: 2 NaN/Inf" in text
    assert read_arrays(record({"b": np.zeros(3, np.float64), "a": reference["a"], "c": reference["c"]}), reference)[1] == [
        "b: dtype float64, expected float32"]
    # integer arrays: a step counter may grow, never go negative; any other stays as the global one
    counters = {"bn.num_batches_tracked": np.array(4), "ids": np.arange(3)}
    assert read_arrays(record({"bn.num_batches_tracked": np.array(9), "ids": np.arange(3)}), counters)[1] == []
    assert read_arrays(record({"bn.num_batches_tracked": np.array(-1), "ids": np.array([0, 7, 2])}), counters)[1] == [
        "bn.num_batches_tracked: step counter outside [0, 2**53]",
        "ids: an integer array training never changes differs from the global one"]
    # float16 on the wire is widened back to the global dtype
    update, problems = read_arrays(record({k: v.astype(np.float16) for k, v in reference.items()}), reference)
    assert problems == [] and all(update[k].dtype == np.float32 for k in reference)


def test_checkpoint_falls_back_when_newest_is_truncated(tmp_path, caplog):
    for round_ in (1, 2):
        save_round(tmp_path, round_, {"w": np.full(4, round_, np.float32)}, {"run": "r", "metrics": {"loss": 1.0 / round_}},
                   server_state={"m.w": np.ones(4)} if round_ == 2 else None)
    latest = load_latest_valid(tmp_path)
    assert latest.round == 2 and latest.params["w"][0] == 2 and "m.w" in latest.server_state
    assert json.loads((tmp_path / "checkpoint" / "meta.json").read_text())["round"] == 2
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == \
        (tmp_path / "checkpoints" / "round_0002" / "model.safetensors").read_bytes()

    model = tmp_path / "checkpoints" / "round_0002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-7])
    with caplog.at_level(logging.ERROR):
        latest = load_latest_valid(tmp_path)
    assert latest.round == 1 and latest.params["w"][0] == 1
    assert "round_0002" in caplog.text and "truncated or altered" in caplog.text


def test_registry_records_and_prints_a_run(tmp_path, capsys):
    registry = Registry(tmp_path / "registry.sqlite")
    registry.start_run("r1", "123", 2, {"seed": 0}, "abc")
    registry.add_site_metrics("r1", 1, "A", 7, 12, {"loss": 0.5})
    registry.add_rejection("r1", 1, "B", 8, ["w: 3 NaN/Inf value(s)"])
    registry.add_round("r1", 1, status="complete", sites_asked=2, sites_accepted=1, seconds=1.5,
                       bytes_sent=100, bytes_received=50, metrics={"loss": 0.5, "examples": 12})
    registry.add_checkpoint("r1", 1, tmp_path / "round_0001", "f" * 64)
    registry.finish_run("r1")
    assert registry.engine.connect().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"

    assert runs_main(["--registry", str(tmp_path / "registry.sqlite"), "show", "r1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run"]["status"] == "finished"
    assert shown["rejections"][0]["site"] == "B" and "NaN" in shown["rejections"][0]["problems"][0]
    assert shown["site_metrics"][0]["examples"] == 12
    assert runs_main(["--registry", str(tmp_path / "registry.sqlite"), "list"]) == 0
    listed = capsys.readouterr().out
    assert "r1" in listed and "finished" in listed and " 1/2" in listed
    assert runs_main(["--registry", str(tmp_path / "registry.sqlite"), "show", "nope"]) == 2
    assert "no run named 'nope'" in capsys.readouterr().err


def test_privacy_caps_tighten_but_never_loosen(caplog):
    site = validate_caps({"max_epsilon": 4.0, "max_delta": 1e-5}, "site")
    assert effective_caps(site, {"max_epsilon": 2.0}) == {"max_epsilon": 2.0, "max_delta": 1e-5}
    with caplog.at_level(logging.WARNING):
        assert effective_caps(site, {"max_epsilon": 10.0, "max_delta": 1e-3}) == site
    assert "looser" in caplog.text
    with pytest.raises(SiteConfigError, match="max_sigma"):
        effective_caps(site, {"max_sigma": 1.0})
    with pytest.raises(SiteConfigError, match="max_delta must be"):
        validate_caps({"max_epsilon": 1.0}, "site")


def test_site_refuses_mismatched_fingerprints():
    mine = {"model": "aaa", "objective": "bbb", "tokenizer": "ccc"}
    check_fingerprints({"fingerprint_model": "aaa", "fingerprint_objective": "bbb", "fingerprint_tokenizer": "ccc"}, mine)
    with pytest.raises(FingerprintMismatch, match="tokenizer: coordinator ddd, site ccc"):
        check_fingerprints({"fingerprint_model": "aaa", "fingerprint_objective": "bbb", "fingerprint_tokenizer": "ddd"}, mine)


def test_central_dp_clips_each_site_update_and_averages_them_equally():
    global_params = {"w": np.zeros(2, np.float32), "ids": np.arange(3)}
    near, far = {"w": np.array([0.3, 0.4], np.float32), "ids": np.arange(3)}, {"w": np.array([30.0, 40.0], np.float32), "ids": np.arange(3)}
    out = dp_fedavg(global_params, [near, far], clipping_norm=1.0, noise_multiplier=0.0)
    # near (norm 0.5) passes unclipped, far (norm 50) is scaled to norm 1; equal weights whatever the examples
    np.testing.assert_allclose(out["w"], ([0.3, 0.4] + np.array([0.6, 0.8])) / 2, rtol=1e-6)
    assert out["w"].dtype == np.float32 and np.array_equal(out["ids"], np.arange(3))
    np.random.seed(0)
    noisy = dp_fedavg({"w": np.zeros(4000)}, [{"w": np.zeros(4000)}] * 2, 1.0, 2.0)["w"]
    assert abs(noisy.std() - 2.0 * 1.0 / 2) < 0.05  # std = noise_multiplier * clipping_norm / sites


class _Grid:
    """A SuperLink stand-in: node 2 connects after the round was sent; each node replies on the second pull."""

    def __init__(self):
        self.pulls, self.sent = 0, []

    def get_node_ids(self):
        return [1, 2] if self.pulls >= 1 else [1]

    def push_messages(self, messages):
        self.sent += messages
        return [f"to-{node}" for node in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids if self.pulls >= 2]


def test_a_site_that_connects_during_a_round_is_sent_the_round_too():
    from server.app import exchange

    grid = _Grid()
    asked, replies = exchange(grid, lambda node: node, [1], timeout_s=10, poll_s=0.01, admit_every_s=0.0)
    assert asked == [1, 2] and grid.sent == [1, 2]
    assert sorted((node, r.metadata.reply_to_message_id) for node, r in replies) == [(1, "to-1"), (2, "to-2")]


def test_a_round_without_late_sites_asks_only_the_connected_ones():
    from server.app import exchange

    grid = _Grid()
    asked, replies = exchange(grid, lambda node: node, [1], timeout_s=10, poll_s=0.01, admit_every_s=60.0)
    assert asked == [1] and [(node, r.metadata.reply_to_message_id) for node, r in replies] == [(1, "to-1")]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return phantom_site_fields(tmp_path_factory.getbasetemp() / "federation_phantom")


@pytest.fixture(scope="module")
def cfg():
    return compose(["federation.rounds=2", "federation.local_steps=2", "train.batch_size=4",
                    # absolute: the stage-2 terms and seg never start, every parameter trains every step
                    "objective.schedule.stage2_step=1000", "objective.schedule.seg_start_step=200"])


def _site(sites, name, tmp_path):
    return dict(sites[name], name=name, state_dir=str(tmp_path / name), device="cpu",
                privacy={"max_epsilon": 8.0, "max_delta": 1e-5}, public_patient_count=10)


def test_one_sharing_rule_from_model_sharing(cfg):
    model = create_model(cfg, seed=int(cfg.seed))
    shared = set(shared_arrays(model, cfg))
    assert shared == set(shared_parameter_names(model, **sharing_settings(cfg)))
    assert shared and all(k.startswith(("image_encoder.", "text_encoder.")) or "_projection." in k for k in shared)
    assert any(k.startswith("objectives.") for k in model.state_dict()) and not any(k.startswith("objectives.") for k in shared)
    fedbn = compose(["model.sharing.fedbn=true"])
    norms = {k for k in shared if ".norm" in k or "LayerNorm" in k}
    assert norms and not norms & set(shared_arrays(model, fedbn))


def test_round_schedule():
    cfg = compose(["federation.rounds=4", "federation.local_steps=5", "objective.schedule.stage2_step=10",
                   "federation.strategy=fedprox", "federation.privacy.max_epsilon=3.0"])
    config = round_config(cfg, 3, "run", {"model": "m"})
    # rounds start at steps 0, 5, 10, 15: HybridMED's stage 2 begins with the round that starts at step 10
    assert [round_config(cfg, r, "run", {})["hybridmed_stage"] for r in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert hybridmed_stage(cfg, 9) == 1 and hybridmed_stage(compose(["objective=g2d"]), 0) == 2
    assert config["start_step"] == 10 and config["proximal_mu"] == cfg.federation.proximal_mu > 0
    assert config["fingerprint_model"] == "m" and config["privacy_max_epsilon"] == 3.0
    assert not any("pattern" in key or "fedbn" in key for key in config)
    assert round_config(compose([]), 1, "run", {})["proximal_mu"] == 0.0


def test_local_only_parameters_persist_between_rounds(sites, cfg, tmp_path):
    cfg = OmegaConf.merge(cfg, {"federation": {"keep_optimizer_state": True}})
    model = create_model(cfg, seed=int(cfg.seed))
    prints = checkpoint_fingerprints(cfg, model.tokenizer)
    shared, site = shared_arrays(model, cfg), _site(sites, "A", tmp_path)
    config = round_config(cfg, 1, "r", prints)
    new_shared, examples, metrics = train_round(shared, config, site, "r", cfg)
    local_file = tmp_path / "A" / "runs" / "r" / "local.safetensors"
    from safetensors.numpy import load_file

    after_round_1 = load_file(local_file)
    assert set(after_round_1) == set(model.state_dict()) - set(shared) and set(new_shared) == set(shared)
    assert examples == len(site_dataset(site, cfg)) >= len(sites["A"]["studies"])  # FedAvg weight: training images
    assert math.isfinite(metrics["loss"]) and metrics["steps"] == 2 and metrics["seconds"] > 0
    assert {"global", "tag", "soft_label"} <= set(metrics) and all(isinstance(v, float) for v in metrics.values())
    assert any(not np.array_equal(new_shared[k], shared[k]) for k in shared)
    changed_local = [k for k, v in after_round_1.items() if not np.array_equal(v, model.state_dict()[k].numpy())]
    assert changed_local, "the local-only heads should have trained"
    # lr 0: nothing changes, so round 2's local-only parameters are round 1's only if they were restored
    train_round(new_shared, dict(round_config(cfg, 2, "r", prints), lr=0.0), site, "r", cfg)
    after_round_2 = load_file(local_file)
    trained = dict(model.named_parameters())  # buffers such as the tag queries are recomputed each round
    for name, value in after_round_1.items():
        if name in trained:
            np.testing.assert_array_equal(after_round_2[name], value, err_msg=name)
    assert any(name in trained for name in after_round_1)
    # the site's AdamW moments carried over: round 2 continued round 1's 2 steps
    steps = {float(v["step"]) for v in torch.load(local_file.with_name("optimizer.pt"))["state"].values()}
    assert steps == {4.0}


def test_a_site_takes_the_rounds_settings_from_the_round_config_alone(sites, cfg, tmp_path):
    """The round's config record is the one source of the round's settings: a site whose composed overrides say
    otherwise (1 local step, no kept moments, another seed) trains what the round config says."""
    model = create_model(cfg, seed=int(cfg.seed))
    config = dict(round_config(cfg, 1, "r", checkpoint_fingerprints(cfg, model.tokenizer)), local_steps=3,
                  keep_optimizer_state=True)
    disagreeing = OmegaConf.merge(cfg, {"seed": 5, "federation": {"local_steps": 1, "keep_optimizer_state": False}})
    _, _, metrics = train_round(shared_arrays(model, cfg), config, _site(sites, "A", tmp_path), "r", disagreeing)
    assert metrics["steps"] == 3
    assert (tmp_path / "A" / "runs" / "r" / "optimizer.pt").is_file()
    assert "federation" not in run_settings(cfg) and "seed" not in run_settings(cfg) and "model" in run_settings(cfg)


def test_optimizer_state_can_restart_every_round(sites, tmp_path):
    fresh = compose(["federation.rounds=2", "federation.local_steps=1", "train.batch_size=4",
                     "federation.keep_optimizer_state=false"])
    model = create_model(fresh, seed=int(fresh.seed))
    site = _site(sites, "A", tmp_path)
    train_round(shared_arrays(model, fresh), round_config(fresh, 1, "r", checkpoint_fingerprints(fresh, model.tokenizer)),
                site, "r", fresh)
    assert (tmp_path / "A" / "runs" / "r" / "local.safetensors").is_file()
    assert not (tmp_path / "A" / "runs" / "r" / "optimizer.pt").exists()


def test_site_refuses_a_round_built_for_another_model(sites, cfg, tmp_path):
    model = create_model(cfg, seed=int(cfg.seed))
    prints = dict(checkpoint_fingerprints(cfg, model.tokenizer), tokenizer="0" * 16)
    with pytest.raises(FingerprintMismatch, match="tokenizer: coordinator 0000000000000000"):
        train_round(shared_arrays(model, cfg), round_config(cfg, 1, "r", prints), _site(sites, "A", tmp_path), "r", cfg)
    assert not (tmp_path / "A" / "runs").exists()


def test_dp_round_sends_only_public_scalars_and_refuses_a_round_over_budget(sites, tmp_path):
    from client.privacy import BudgetExceeded

    cfg = compose(["privacy=dpsgd", "federation.rounds=2", "federation.local_steps=1", "train.batch_size=2"])
    model = create_model(cfg, seed=int(cfg.seed))
    config = round_config(cfg, 1, "dp", checkpoint_fingerprints(cfg, model.tokenizer))
    site = dict(_site(sites, "B", tmp_path), name=f"dp-{tmp_path.name}")  # its own ledger entries in the catalog
    new_shared, examples, metrics = train_round(shared_arrays(model, cfg), config, site, "dp", cfg)
    assert set(metrics) == {"epsilon", "epsilon_total", "delta", "noise_multiplier", "sample_rate", "steps"}
    assert 0 < metrics["epsilon"] <= 8.0 and metrics["delta"] == 1e-5 and metrics["steps"] == 1
    # the rate and the weight come from the site's declared public count, never its real one (docs/privacy.md)
    assert metrics["sample_rate"] == pytest.approx(2 / 10) and examples == pytest.approx(2 * metrics["steps"])
    poor = dict(site, name=f"dp-poor-{tmp_path.name}", state_dir=str(tmp_path / "poor"),
                privacy={"max_epsilon": 1e-3, "max_delta": 1e-5})
    with pytest.raises(BudgetExceeded, match="over the budget max_epsilon=0.001"):
        train_round(shared_arrays(model, cfg), config, poor, "dp", cfg)
    assert not (tmp_path / "poor" / "runs").exists(), "a refused round trains nothing"


def test_server_refuses_invalid_privacy_before_asking_any_site(tmp_path):
    from server.app import check_supported

    check_supported(compose(["privacy=secagg"]))
    with pytest.raises(ValueError, match="max_weight"):
        check_supported(compose(["privacy=secagg", "privacy.secagg.max_weight=0"]))
    with pytest.raises(ValueError, match="strategy=median"):  # validate_privacy_config's own refusal
        check_supported(compose(["privacy=central_dp", "federation.strategy=median"]))
    check_supported(compose(["privacy=central_dp"]))


def test_fedavgm_accumulates_momentum_by_hand_and_lr_1_beta_0_is_fedavg():
    opt = ServerOptimizer("momentum", lr=1.0, beta1=0.5)
    w = {"w": np.zeros(2, np.float32)}
    w = opt.step(w, {"w": w["w"] + 1.0})             # m = 1 -> w = 1
    w = opt.step(w, {"w": w["w"] + 1.0})             # m = 0.5 * 1 + 1 = 1.5 -> w = 2.5
    np.testing.assert_allclose(w["w"], 2.5)
    plain = ServerOptimizer("momentum", lr=1.0, beta1=0.0)
    out = plain.step({"w": np.zeros(2, np.float32)}, {"w": np.array([0.3, -2.0], np.float32)})
    np.testing.assert_allclose(out["w"], [0.3, -2.0], rtol=1e-6)


@pytest.mark.parametrize("kind", ["adam", "yogi", "momentum"])
def test_server_steps_leave_normalisation_statistics_at_the_sites_mean(kind):
    opt = ServerOptimizer(kind, lr=5.0, beta1=0.9)
    current = {"head.1.running_var": np.full(3, 0.2, np.float32), "head.1.num_batches_tracked": np.array(4),
               "head.0.weight": np.zeros(3, np.float32)}
    averaged = {"head.1.running_var": np.full(3, 0.05, np.float32), "head.1.num_batches_tracked": np.array(9),
                "head.0.weight": np.full(3, 0.1, np.float32)}
    out = opt.step(current, averaged)
    np.testing.assert_array_equal(out["head.1.running_var"], averaged["head.1.running_var"])   # not 0.2 - 5 * 0.15
    assert int(out["head.1.num_batches_tracked"]) == 9
    assert not np.allclose(out["head.0.weight"], averaged["head.0.weight"])                    # weights do step


def test_cyclic_asks_each_site_in_turn_and_its_budget_is_one_site_per_round():
    nodes = [17, 4, 9]
    cyclic = compose(["federation.strategy=cyclic", "federation.rounds=12", "federation.local_steps=25"])
    fedavg = compose(["federation.rounds=12", "federation.local_steps=25"])
    asked = [strategy_from_config(cyclic.federation).sites_of_round(nodes, r) for r in range(1, 7)]
    assert asked == [[17], [4], [9], [17], [4], [9]]
    assert strategy_from_config(fedavg.federation).sites_of_round(nodes, 5) == nodes
    assert strategy_from_config(cyclic.federation).total_local_steps(12, 25, 4) == 300
    assert strategy_from_config(fedavg.federation).total_local_steps(12, 25, 4) == 1200
    # one site's update passes through the aggregator unchanged
    update = {"w": np.array([0.25, -1.5], np.float32)}
    np.testing.assert_array_equal(strategy_from_config(cyclic.federation).aggregate_updates({"w": np.zeros(2)},
                                                                                           [(update, 7)])["w"],
                                  update["w"])


@pytest.mark.parametrize("overrides, kind, settings", [
    (["federation.strategy=fedadam", "federation.server_lr=0.3", "federation.beta1=0.8", "federation.beta2=0.95",
      "federation.tau=0.02"], "adam", dict(lr=0.3, beta1=0.8, beta2=0.95, tau=0.02)),
    (["federation.strategy=fedyogi", "federation.server_lr=0.2", "federation.tau=0.05"], "yogi",
     dict(lr=0.2, beta1=0.9, beta2=0.99, tau=0.05)),
    (["federation.strategy=fedavgm", "federation.server_lr=0.7", "federation.beta1=0.3"], "momentum",
     dict(lr=0.7, beta1=0.3)),
])
def test_a_server_step_strategy_builds_its_optimizer_from_flowers_settings(overrides, kind, settings):
    strategy = strategy_from_config(compose(overrides).federation)
    assert strategy.optimizer.kind == kind
    assert {name: getattr(strategy.optimizer, name) for name in settings} == pytest.approx(settings)


@pytest.mark.parametrize("privacy", ["secagg", "central_dp", "dpsgd_secagg"])
def test_cyclic_refuses_mechanisms_that_need_several_sites_per_round(privacy):
    from server.app import check_supported

    with pytest.raises(ValueError, match="one site per round"):
        check_supported(compose([f"privacy={privacy}", "federation.strategy=cyclic"]))
    check_supported(compose(["privacy=dpsgd", "federation.strategy=cyclic"]))


class _FailingGrid:
    """A SuperLink with two nodes whose every reply is an error."""

    def __init__(self):
        self.sent = []

    def get_node_ids(self):
        return [8, 3]

    def push_messages(self, messages):
        self.sent += [m.metadata.dst_node_id for m in messages]
        return [f"to-{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, ids):
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), has_error=lambda: True,
                                error=SimpleNamespace(reason="site crashed")) for i in ids]


def test_a_cyclic_round_whose_site_fails_is_skipped_and_the_model_unchanged(tmp_path, monkeypatch):
    import server.app
    from server.app import Federation

    # Flower's Message needs a running ServerApp's run id; the grid only reads the destination
    monkeypatch.setattr(server.app, "Message", lambda content, dst_node_id, **_: SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=dst_node_id)))
    cfg = compose(["federation.strategy=cyclic", "federation.rounds=2", f"federation.output_dir={tmp_path}",
                   "federation.run_name=cyc", "federation.poll_s=0.01", "federation.wait_for_sites_s=1"])
    grid = _FailingGrid()
    federation = Federation(grid, cfg)
    federation.registry.start_run("cyc", None, 2, {}, "hash")
    params = {"w": np.ones(3, np.float32)}
    assert federation.round(1, params) is params and federation.round(2, params) is params
    assert grid.sent == [3, 8], "one node per round, in node order, and no other node admitted late"
    shown = federation.registry.describe("cyc")
    assert [(r["round"], r["status"], r["sites_asked"]) for r in shown["rounds"]] == [(1, "skipped", 1), (2, "skipped", 1)]
    assert [(r["round"], int(r["node_id"])) for r in shown["rejections"]] == [(1, 3), (2, 8)]
    assert "site crashed" in shown["rejections"][0]["problems"][0]
    assert load_latest_valid(tmp_path / "cyc") is None, "a skipped round writes no checkpoint"



@pytest.mark.parametrize("strategy, expected", [("cyclic", 3), ("fedavg", 5)])
def test_each_round_tells_the_site_how_many_rounds_it_trains_in_all(tmp_path, monkeypatch, strategy, expected):
    import server.app
    from server.app import Federation

    sent = []
    monkeypatch.setattr(server.app, "Message", lambda content, dst_node_id, **_: sent.append(content) or SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=dst_node_id)))
    cfg = compose([f"federation.strategy={strategy}", "federation.rounds=5", f"federation.output_dir={tmp_path}",
                   "federation.run_name=r", "federation.poll_s=0.01", "federation.wait_for_sites_s=1"])
    federation = Federation(_FailingGrid(), cfg)
    federation.registry.start_run("r", None, 5, {}, "hash")
    try:
        federation.round(1, {"w": np.ones(3, np.float32)})
    except RuntimeError:   # FedAvg: no accepted update is too few sites
        pass
    # 2 nodes: cyclic gives each at most 3 of the 5 rounds (its DP noise is sized for those), FedAvg all 5
    assert {int(c["config"]["site_rounds"]) for c in sent} == {expected}
    cyclic, median = (strategy_from_config(compose([f"federation.strategy={name}", "federation.min_sites=3"]).federation)
                      for name in ("cyclic", "median"))
    assert cyclic.site_rounds(3, 14) == 5 and cyclic.site_rounds(4, 12) == 3 and median.site_rounds(3, 14) == 14


def test_a_dp_site_sizes_its_noise_for_its_own_rounds(sites, tmp_path):
    cfg = compose(["privacy=dpsgd", "privacy.dpsgd.target_epsilon=4.0", "federation.rounds=4",
                   "federation.local_steps=1", "train.batch_size=2"])
    model = create_model(cfg, seed=int(cfg.seed))
    prints = checkpoint_fingerprints(cfg, model.tokenizer)
    noise = {}
    for turns in (4, 1):   # every round (FedAvg), or one turn in four (cyclic over 4 sites)
        site = dict(_site(sites, "B", tmp_path), name=f"dp-turns{turns}-{tmp_path.name}",
                    state_dir=str(tmp_path / f"turns{turns}"))
        config = dict(round_config(cfg, 1, f"dp{turns}", prints), site_rounds=turns)
        _, _, metrics = train_round(shared_arrays(model, cfg), config, site, f"dp{turns}", cfg)
        noise[turns] = metrics["noise_multiplier"]
        if turns == 1:   # its one turn spends the whole target
            assert 3.6 <= metrics["epsilon_total"] <= 4.0
    assert noise[1] < noise[4]
