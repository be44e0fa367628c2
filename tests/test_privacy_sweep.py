"""The privacy sweep's arms, checks and table (the arms' simulations themselves: tests/test_privacy_simulation.py)."""
import pytest
from omegaconf import OmegaConf

from shared_models.config import compose
from simulations.privacy_sweep import arm_overrides, check_epsilons, plot_sweep, sweep_markdown, sweep_rows


def test_every_arm_trains_the_same_model_and_only_privacy_differs():
    arms = {eps: compose(arm_overrides(eps), config_name="privacy_sweep") for eps in (None, 1.0, 8.0)}
    models = {eps: OmegaConf.to_container(cfg.model, resolve=True) for eps, cfg in arms.items()}
    assert models[None] == models[1.0] == models[8.0]
    assert models[None]["projection_head"] == "linear"             # DP-SGD's heads, in the non-DP arm too
    assert arms[None].privacy.dpsgd is None
    assert [arms[e].privacy.dpsgd.target_epsilon for e in (1.0, 8.0)] == [1.0, 8.0]
    assert all(cfg.federation.privacy.max_delta == 1e-5 and cfg.federation.sites == 4 for cfg in arms.values())
    for key in ("federation", "train", "data", "partition"):
        assert OmegaConf.to_container(arms[None][key], resolve=True) == OmegaConf.to_container(arms[8.0][key],
                                                                                              resolve=True)


@pytest.mark.parametrize("bad", [[], [0], [-1, 4], ["nan"], None])
def test_epsilons_must_be_positive_numbers(bad):
    with pytest.raises(ValueError, match="epsilons"):
        check_epsilons(bad)


def _summary(auc, epsilons=None, noise=None, loss=None):
    site = {**({"noise_multiplier": noise} if noise else {}), **({"loss": loss} if loss else {})}
    return {"config": {"privacy": {"dpsgd": {"target_epsilon": 4.0} if epsilons else None},
                       "federation": {"privacy": {"max_delta": 1e-5}}},
            "final": {"federated": {"linear_probe": {"0.1": {"mean_auc": {"mean": auc}}}},
                      "random": {"linear_probe": {"0.1": {"mean_auc": {"mean": 0.5}}}}},
            "rounds": [{"sites": {"a": site, "b": site}}], "epsilon": epsilons or {}, "wall_s": 10.0}


def test_rows_take_the_largest_epsilon_over_sites_and_the_table_and_plot_are_written(tmp_path):
    rows = sweep_rows({"no_dp": _summary(0.7, loss=3.0), "epsilon_4": _summary(0.6, {"a": 3.2, "b": 3.9}, noise=1.1)})
    assert rows[0]["epsilon_spent"] is None and rows[0]["final_loss"] == 3.0
    assert rows[1]["epsilon_spent"] == 3.9 and rows[1]["noise_multiplier"] == 1.1 and rows[1]["delta"] == 1e-5
    assert [r["federated_auc"] for r in rows] == [0.7, 0.6] and rows[1]["label_fraction"] == "0.1"
    table = sweep_markdown(rows)
    assert "| epsilon_4 | 4.0 | 3.90 | 1.10 | 0.600 | 0.500 |" in table
    plot_sweep(tmp_path / "sweep.png", rows)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
