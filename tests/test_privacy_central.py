"""Site-level DP-FedAvg at the server, accounted: central epsilon per round and in total in the run registry, no
zero noise, Poisson sampling of sites with secret coins, the noise on the sum over the expected number of sites."""
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from client.privacy import validate_privacy_config
from server.central_dp import CentralDp, dp_fedavg
from server.registry import Registry
from shared_models.config import compose
from tests.test_server_hardening import GLOBAL, ReplyGrid, content, federation, honest  # noqa: F401 (fixture)


def test_the_server_records_central_epsilon_per_round_and_in_total(federation):
    grid = ReplyGrid({node: (lambda node=node: content(arrays=honest(node), site=f"S{node}")) for node in (1, 2, 3)})
    fed = federation(grid, "privacy=central_dp", "privacy.central_dp.noise_multiplier=1.2")
    params = fed.round(1, GLOBAL)
    fed.round(2, params)
    rounds = Registry(fed.registry.engine.url.database).describe("r")["rounds"]   # what `server.runs show` prints
    accountant = RDPAccountant()
    for row in rounds:
        accountant.step(noise_multiplier=1.2, sample_rate=1.0)
        assert row["metrics"]["central_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
        assert row["metrics"]["central_delta"] == 1e-5 and row["metrics"]["central_site_fraction"] == 1.0
    one, two = (row["metrics"]["central_epsilon"] for row in rounds)
    assert rounds[1]["metrics"]["central_epsilon_round"] == pytest.approx(one)
    assert one < two < 2 * one   # composed, not summed


@pytest.mark.parametrize("override, reason", [
    ("privacy.central_dp.noise_multiplier=0", "noise_multiplier must be a number > 0"),
    ("privacy.central_dp.site_fraction=0", "site_fraction must be in"),
    ("privacy.central_dp.site_fraction=1.5", "site_fraction must be in"),
    ("privacy.central_dp.delta=0", "delta must be in"),
])
def test_a_central_dp_without_noise_or_with_an_impossible_fraction_is_refused(override, reason):
    with pytest.raises(ValueError, match=reason):
        validate_privacy_config(compose(["privacy=central_dp", override]))
    with pytest.raises(ValueError, match=reason.replace("a number ", "a finite number ")):
        block = dict(compose(["privacy=central_dp", override]).privacy.central_dp)
        CentralDp.from_config(block)


def test_sites_are_sampled_at_the_fraction_with_coins_no_seed_replays():
    central = CentralDp(noise_multiplier=1.0, clipping_norm=1.0, site_fraction=0.3)
    nodes = list(range(4000))
    draws = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        draws.append(central.sample_sites(nodes))
    assert draws[0] != draws[1]
    assert all(abs(len(d) - 1200) < 5 * (4000 * 0.3 * 0.7) ** 0.5 for d in draws)
    assert set(draws[0]) <= set(nodes) and CentralDp(1.0, 1.0).sample_sites(nodes) == nodes
    # the accountant uses the fraction as the sampling rate
    assert central.epsilon(10) == pytest.approx(
        __import__("client.privacy", fromlist=["epsilon_spent"]).epsilon_spent([(1.0, 0.3, 10)], 1e-5))
    assert central.epsilon(10) < CentralDp(1.0, 1.0).epsilon(10)


def test_sampled_rounds_divide_the_noised_sum_by_the_expected_number_of_sites():
    """Fixed denominator (McMahan et al. 2018): sum of clipped updates + N(0, (z C)^2), over fraction x connected."""
    central = CentralDp(noise_multiplier=1e-9, clipping_norm=1.0, site_fraction=0.5)
    global_params = {"w": np.zeros(2, np.float32)}
    near, far = {"w": np.array([0.3, 0.4], np.float32)}, {"w": np.array([30.0, 40.0], np.float32)}
    out = central.aggregate(global_params, [near, far], connected=8)   # 4 sites expected, 2 replied
    np.testing.assert_allclose(out["w"], (np.array([0.3, 0.4]) + np.array([0.6, 0.8])) / 4, rtol=1e-6)
    noises = []
    for _ in range(2):
        np.random.seed(0)   # the noise does not come from NumPy's global generator
        noises.append(dp_fedavg({"w": np.zeros(4000)}, [{"w": np.zeros(4000)}] * 2, 1.0, 2.0, expected_sites=4)["w"])
    assert not np.allclose(noises[0], noises[1])
    assert noises[0].std() == pytest.approx(2.0 * 1.0 / 4, rel=0.05)
