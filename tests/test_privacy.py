"""Patient-level DP-SGD: sensitivity bound by brute force, accountant, the site's ledger and budget, config rules."""
import contextlib
import copy
import subprocess
import sys
import textwrap
import threading
import types

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn

from client.privacy import (
    COUPLED_TERMS,
    BudgetExceeded,
    ClipNorms,
    DpSgdSettings,
    PatientSampler,
    PrivacyError,
    PrivacyLedger,
    clipped_gradient_sum,
    dp_train_round,
    epsilon_spent,
    require_group_norm,
    validate_privacy_config,
)
from client.privacy.clipped_sum import (loop_workers, only_terms, per_study_gradients, per_study_method,
                                        trainable_parameters)
from client.privacy.sampling import secret_generator
from client.privacy.training import noisy_gradient
from client.trainer import TrainSettings
from shared_models.batch import collate
from shared_models.config import compose
from shared_models.factory import create_model
from shared_models.objectives import GlobalContrastive, SoftLabelContrastive
from tests.test_model import SIZE, make_sample

PROJECT_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


# -- a two-tower toy: tiny linear encoders, one per-patient term and the two coupled objectives ----------
class TwoTower(nn.Module):
    COUPLED = {"global": GlobalContrastive(0.07), "soft_label": SoftLabelContrastive(0.07, 0.8)}

    def __init__(self, lambdas: dict[str, float]):
        super().__init__()
        self.lambdas = dict(lambdas)
        self.image, self.text, self.head = nn.Linear(6, 4), nn.Linear(5, 4), nn.Linear(4, 3)

    def active_terms(self, step: int) -> list[str]:
        return list(self.lambdas)

    def forward(self, batch: dict, step: int = 0) -> dict[str, torch.Tensor]:
        return self.terms(self.image(batch["x"]), self.text(batch["y"]), batch)

    def terms(self, u: torch.Tensor, v: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        out = {}
        if "global" in self.lambdas:
            out["global"] = self.COUPLED["global"](u, v)
        if "soft_label" in self.lambdas:
            out["soft_label"] = self.COUPLED["soft_label"](u, v, batch["tags"])
        if "tag" in self.lambdas:  # per patient: each study's own target
            out["tag"] = (self.head(u) - batch["t"]).pow(2).sum(1).mean()
        out["loss"] = sum(self.lambdas[k] * out[k] for k in out)
        return out


def toy_samples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(6, generator=g) * 3, "y": torch.randn(5, generator=g) * 3,
             "tags": (torch.rand(4, generator=g) < 0.5).float(), "t": torch.randn(3, generator=g)} for _ in range(n)]


def toy_collate(samples: list[dict]) -> dict:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def neighbour_gaps(model, samples, collate_fn, clip, step=0, removed=None, per_study="auto") -> list[float]:
    """||S(B) - S(B minus one patient)|| for each patient removed (all by default)."""
    full = flat(clipped_gradient_sum(model, samples, collate_fn, step, clip, coupled_scale=len(samples),
                                     per_study=per_study).gradient)
    gaps = []
    for k in removed if removed is not None else range(len(samples)):
        rest = samples[:k] + samples[k + 1:]
        # The coupled scale is a public constant: the same on both neighbours.
        smaller = clipped_gradient_sum(model, rest, collate_fn, step, clip, coupled_scale=len(samples),
                                       per_study=per_study).gradient
        gaps.append(float((full - flat(smaller)).norm()))
    return gaps


# -- 1. the sensitivity bound, by brute force ----------------------------------------------------------
HYBRID_FAST = [f"model.image.img_size={SIZE}", "model.image.kwargs.depth=2", "model.text.max_length=48",
               "model.text.tokenizer.num_reports=300", "model.text.config.hidden_size=32",
               "model.text.config.num_hidden_layers=1", "model.text.config.intermediate_size=64",
               "model.projection_dim=32", "objective=hybrid", "objective.schedule.stage2_step=0",
               "objective.schedule.seg_start_step=0", "objective.tag.layers=1", "objective.impression.layers=1",
               "objective.seg.width=16", "privacy=dpsgd"]  # the DP preset: linear projection heads


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return create_model(compose(HYBRID_FAST))


@pytest.mark.parametrize("term", ["global", "global_impression", "token", "summary", "caption", "distill",
                                  "region", "tag", "soft_label", "seg", "all", "all, loop"])
def test_summed_clipped_gradient_stays_within_the_calibrated_bound(hybrid, term):
    # "all, loop": every term through the loop, whose coupled terms reuse the per-patient passes' encodings
    terms = set(hybrid.lambdas) if term.startswith("all") else {term}
    samples = [make_sample(i + 3 * len(term)) for i in range(4)]
    clip = ClipNorms(patient=1e-3, coupled=1e-3)  # small: every gradient is clipped, the bound is nearly tight
    collate_fn = lambda s: collate(s, hybrid.tokenizer, max_length=48)  # noqa: E731
    hybrid.eval()   # fixed masks: with dropout the two neighbours would see different functions
    try:
        with only_terms(hybrid, terms):
            gaps = neighbour_gaps(hybrid, samples, collate_fn, clip, removed=[0, 3],
                                  per_study="loop" if term.endswith("loop") else "auto")
    finally:
        hybrid.train()
    assert max(gaps) <= clip.sensitivity * (1 + 1e-4), (term, gaps, clip.sensitivity)
    # a patient's presence does show (the test is not vacuous); a coupled term alone moves only the direction of one
    # clipped vector (test_privacy_soundness's adversarial neighbour shows how far it can move it: nearly 2 C_b)
    assert min(gaps) > (0.5 * clip.patient if terms - COUPLED_TERMS else 0.1 * clip.coupled)
    if not terms & COUPLED_TERMS:
        # Per-patient terms: the patient's share of S(B) is exactly its own clipped gradient on its study alone
        # (dropout off, so that the three sums see the same function).
        hybrid.eval()
        with only_terms(hybrid, terms):
            with_z = clipped_gradient_sum(hybrid, samples, collate_fn, 0, clip, coupled_scale=4).gradient
            without_z = clipped_gradient_sum(hybrid, samples[1:], collate_fn, 0, clip, coupled_scale=4).gradient
            alone = clipped_gradient_sum(hybrid, samples[:1], collate_fn, 0, clip, coupled_scale=4).gradient
        hybrid.train()
        assert torch.allclose(flat(with_z) - flat(without_z), flat(alone), atol=1e-7)


def test_one_vmapped_pass_gives_each_studys_own_gradient(hybrid):
    """The per-patient summands from one vmapped pass equal the loop's one pass per patient, term by term,
    with studies lacking findings or impression and texts of different lengths in one batch."""
    samples = [make_sample(0), make_sample(1, findings=False), make_sample(2, impression=False), make_sample(3)]
    collate_fn = lambda s: collate(s, hybrid.tokenizer, max_length=48)  # noqa: E731
    params = trainable_parameters(hybrid)
    per_patient = set(hybrid.lambdas) - COUPLED_TERMS
    hybrid.eval()   # no dropout: the two methods draw different masks
    try:
        with only_terms(hybrid, per_patient):
            rows, terms = per_study_gradients(hybrid, collate_fn(samples), 0, params, contextlib.nullcontext)
            for i, sample in enumerate(samples):
                alone = torch.autograd.grad(hybrid(collate_fn([sample]), step=0)["loss"], params, allow_unused=True)
                alone = flat([torch.zeros_like(p) if g is None else g for p, g in zip(params, alone)])
                torch.testing.assert_close(flat([g[i] for g in rows]), alone, atol=2e-6, rtol=1e-4)
            assert terms["summary"][1] == 0 and terms["token"][1] == 0 and terms["summary"][2] == 0
            assert terms["summary"][0] > 0 and terms["region"].shape == (4,)
        clip = ClipNorms(patient=0.05, coupled=1.0)
        for term in sorted(per_patient):
            with only_terms(hybrid, {term}):
                by_vmap = clipped_gradient_sum(hybrid, samples, collate_fn, 0, clip, 4, per_study="vmap")
                by_loop = clipped_gradient_sum(hybrid, samples, collate_fn, 0, clip, 4, per_study="loop")
            torch.testing.assert_close(flat(by_vmap.gradient), flat(by_loop.gradient), atol=2e-6, rtol=1e-4)
            assert by_vmap.clipped_patients == by_loop.clipped_patients, term
            assert by_vmap.terms[term] == pytest.approx(by_loop.terms[term], rel=1e-4, abs=1e-6), term
    finally:
        hybrid.train()
    with pytest.raises(PrivacyError, match="per_study"):
        clipped_gradient_sum(hybrid, samples, collate_fn, 0, clip, 4, per_study="ghost")
    with pytest.raises(PrivacyError, match="per_study"):
        DpSgdSettings(per_study="ghost")
    # auto: vmap for a ViT image encoder, the loop for a CNN's (measured faster on CPU, benchmarks/privacy.py)
    assert per_study_method(hybrid, "auto") == "vmap" and per_study_method(hybrid, "loop") == "loop"
    cnn = types.SimpleNamespace(image_encoder=types.SimpleNamespace(is_transformer=False))
    assert per_study_method(cnn, "auto") == "loop" and per_study_method(cnn, "vmap") == "vmap"


def test_loop_reuses_each_studys_encoding_for_the_coupled_terms(hybrid):
    """With every term of `hybrid` on, the loop takes the coupled terms' batch gradient through the encoder
    outputs kept from its per-patient passes: the image encoder runs once per study and never on the whole
    batch, and S(B) equals the vmap path's, whose coupled terms run a second forward of the batch."""
    samples = [make_sample(0), make_sample(1, findings=False), make_sample(2, impression=False), make_sample(3)]
    collate_fn = lambda s: collate(s, hybrid.tokenizer, max_length=48)  # noqa: E731
    seen = []
    hook = hybrid.image_encoder.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    hybrid.eval()   # no dropout: the two methods draw different masks
    try:
        for clip in (ClipNorms(patient=1e9, coupled=1e9), ClipNorms(patient=0.05, coupled=0.05)):
            seen.clear()
            by_loop = clipped_gradient_sum(hybrid, samples, collate_fn, 0, clip, 4, per_study="loop")
            assert seen == [1, 1, 1, 1]
            by_vmap = clipped_gradient_sum(hybrid, samples, collate_fn, 0, clip, 4, per_study="vmap")
            assert seen[-1] == 4   # the vmap path's coupled terms encode the batch again
            # float sums in another order: the unclipped entries reach about 100
            torch.testing.assert_close(flat(by_loop.gradient), flat(by_vmap.gradient), atol=2e-4, rtol=1e-4)
            assert set(by_loop.terms) == set(hybrid.lambdas) | {"loss"}
            for term in COUPLED_TERMS:
                assert by_loop.terms[term] == pytest.approx(by_vmap.terms[term], rel=1e-5), term
    finally:
        hook.remove()
        hybrid.train()


def test_loop_on_several_threads_sums_the_same_gradient_with_one_intra_op_thread_each(hybrid):
    """The loop's studies split over 3 worker threads (fixed shares, one intra-op thread each, the coupled terms'
    backward also split by study) give the S(B), clip count and terms of the one-thread loop; the process's
    thread setting is restored."""
    samples = [make_sample(0), make_sample(1, findings=False), make_sample(2, impression=False), make_sample(3),
               make_sample(4)]
    collate_fn = lambda s: collate(s, hybrid.tokenizer, max_length=48)  # noqa: E731
    seen = []
    hook = hybrid.image_encoder.register_forward_hook(
        lambda module, args, out: seen.append((threading.get_ident(), torch.get_num_threads())))
    threads = torch.get_num_threads()
    parameters = dict(hybrid.named_parameters())
    hybrid.eval()   # no dropout: the two runs draw different masks
    try:
        for clip in (ClipNorms(patient=1e9, coupled=1e9), ClipNorms(patient=0.05, coupled=0.05)):
            seen.clear()
            one = clipped_gradient_sum(hybrid, samples, collate_fn, 0, clip, 5, per_study="loop", workers=1)
            assert {ident for ident, _ in seen} == {threading.get_ident()} and len(seen) == 5
            seen.clear()
            three = clipped_gradient_sum(hybrid, samples, collate_fn, 0, clip, 5, per_study="loop", workers=3)
            assert len({ident for ident, _ in seen}) == 3 and len(seen) == 5
            assert {used for _, used in seen} == {1}
            assert torch.get_num_threads() == threads
            # float sums in another order (and matmuls blocked for another thread count): judged against the
            # gradient's own scale, since an entry near zero may cancel to exactly 0 in one order only
            scale = float(flat(one.gradient).abs().max())
            gap = flat(three.gradient) - flat(one.gradient)
            assert float(gap.norm()) <= 1e-5 * float(flat(one.gradient).norm())
            assert float(gap.abs().max()) <= 1e-5 * scale
            assert three.clipped_patients == one.clipped_patients
            assert three.terms == pytest.approx(one.terms, rel=1e-6)
            # the threads only read the model: every parameter is still the very one it was (a swap on one
            # thread, saved and put back by another, once left detached copies in the model)
            now = dict(hybrid.named_parameters())
            assert now.keys() == parameters.keys() and all(now[n] is parameters[n] for n in parameters)
        assert one.clipped_patients == 5
    finally:
        hook.remove()
        hybrid.train()
    params = trainable_parameters(hybrid)
    assert loop_workers(params, None, 8) == min(8, threads) and loop_workers(params, 4, 3) == 3
    assert loop_workers(params, 4, 0) == 1
    with pytest.raises(PrivacyError, match="workers"):
        loop_workers(params, 0, 8)
    assert loop_workers([torch.zeros(1, device="meta")], 4, 8) == 1   # not a CPU: one study at a time


def test_dp_round_on_the_hybrid_model_trains_local_heads_under_dp(hybrid, tmp_path):
    model = copy.deepcopy(hybrid)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = [make_sample(i) for i in range(8)]
    dataset = type("Studies", (list,), {})(dataset)
    dataset.patient_ids = [f"p{i // 2}" for i in range(8)]
    dataset.study_ids = [f"s{i}" for i in range(8)]
    site = {"name": "A", "catalog": str(tmp_path / "c.sqlite"), "privacy": {"max_epsilon": 100.0, "max_delta": 1e-5},
            "public_patient_count": 4}
    settings = TrainSettings(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, amp=False)
    result = dp_train_round(model, dataset, lambda s: collate(s, model.tokenizer, max_length=48), settings,
                            {"noise_multiplier": 1.0}, site, "run-h", 1, planned_steps=2)
    moved = {name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters()
             if not torch.equal(before[name], p.detach())}
    assert {"objectives.tag", "objectives.seg", "objectives.impression"} <= moved   # local-only heads
    assert any(name.startswith("image_encoder") for name in moved) and result.charge.epsilon_run > 0


def test_hybrid_terms_are_split_into_per_patient_and_coupled(hybrid):
    assert COUPLED_TERMS <= set(hybrid.lambdas)
    # A coupled term seen on one study alone has no negatives: value 0 and gradient 0 (so it must be batch-clipped).
    one = collate([make_sample(0)], hybrid.tokenizer, max_length=48)
    for term in COUPLED_TERMS:
        with only_terms(hybrid, {term}):
            assert float(hybrid(one, step=0)[term].detach()) == pytest.approx(0.0, abs=1e-5)


def naive_per_sample_clipped_sum(model: TwoTower, samples: list[dict], clip: float, unclipped: bool = False):
    """Plain DP-SGD on a contrastive loss: each study's gradient through its own encoder pass, the other
    studies' embeddings as constants (stop-gradient on the negatives), each clipped to `clip`, summed."""
    batch = toy_collate(samples)
    u, v = model.image(batch["x"]), model.text(batch["y"])
    n = len(samples)
    loss = n * model.terms(u, v, batch)["loss"]  # the sum form: n times the objective's mean
    du, dv = torch.autograd.grad(loss, [u, v])
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for k in range(n):
        own = (model.image(batch["x"][k:k + 1]) * du[k]).sum() + (model.text(batch["y"][k:k + 1]) * dv[k]).sum()
        grads = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(params, torch.autograd.grad(own, params, allow_unused=True))]
        norm = float(flat(grads).norm())
        factor = 1.0 if unclipped else min(1.0, clip / max(norm, 1e-12))
        total = [t + factor * g for t, g in zip(total, grads)]
    return flat(total)


@pytest.mark.parametrize("term", ["global", "soft_label"])
def test_plain_per_sample_clipping_of_a_contrastive_loss_breaks_its_naive_bound(term):
    torch.manual_seed(1)
    model = TwoTower({term: 1.0})
    samples = toy_samples(8, seed=2)
    # The decomposition is exact: unclipped, the per-sample pieces add up to the batch gradient.
    params = list(model.parameters())
    exact = flat([torch.zeros_like(p) if g is None else g for p, g in zip(
        params, torch.autograd.grad(8 * model(toy_collate(samples))["loss"], params, allow_unused=True))])
    assert torch.allclose(naive_per_sample_clipped_sum(model, samples, 1.0, unclipped=True), exact, atol=1e-4)

    clip = 0.1
    full = naive_per_sample_clipped_sum(model, samples, clip)
    naive_gaps = [float((full - naive_per_sample_clipped_sum(model, samples[:k] + samples[k + 1:], clip)).norm())
                  for k in range(8)]
    assert max(naive_gaps) > 1.5 * clip, naive_gaps  # one patient moves every other patient's clipped gradient

    # The same batches under the calibrated method stay within C + 2 C_b.
    norms = ClipNorms(patient=clip, coupled=clip)
    assert max(neighbour_gaps(model, samples, toy_collate, norms)) <= norms.sensitivity * (1 + 1e-5)


def test_unclipped_sum_is_the_non_private_gradient():
    """With clip norms that never bind, S(B)/n is the ordinary gradient of the mean per-patient loss + coupled loss."""
    torch.manual_seed(3)
    model = TwoTower({"tag": 1.0, "global": 0.5, "soft_label": 0.25})
    samples = toy_samples(5, seed=4)
    summed = clipped_gradient_sum(model, samples, toy_collate, 0, ClipNorms(1e9, 1e9), coupled_scale=5)
    expected = torch.autograd.grad(model(toy_collate(samples))["loss"], list(model.parameters()))
    assert torch.allclose(flat(summed.gradient) / 5, flat(expected), atol=1e-5)


def test_noise_has_the_calibrated_scale():
    clip = ClipNorms(patient=0.5, coupled=0.25)
    zeros = [torch.zeros(20_000), torch.zeros(100, 50)]
    noisy = noisy_gradient(zeros, noise_std=1.3 * clip.sensitivity, scale=4.0, generator=secret_generator())
    assert float(flat(noisy).std()) == pytest.approx(1.3 * (0.5 + 2 * 0.25) / 4.0, rel=0.03)


def test_batch_norm_model_is_refused():
    with pytest.raises(PrivacyError, match="model.image.norm=group"):
        require_group_norm(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(PrivacyError, match=r"'image_projection\.1'.*start the federation with model\.projection_head=linear$"):
        require_group_norm(create_model(compose(["model=tiny", "objective=clip", "model.image.norm=group"])))
    require_group_norm(create_model(compose(["model=tiny", "objective=clip", "privacy=dpsgd"])))
    require_group_norm(nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4)))


# -- 2. sampling: patients, one study each -------------------------------------------------------------
def test_patient_sampler_draws_each_patient_at_most_once_at_the_sample_rate():
    patients = ["a"] * 6 + ["b"] * 2 + [f"p{i}" for i in range(12)]          # a: 3 studies x 2 images
    studies = ["a1", "a1", "a2", "a2", "a3", "a3", "b1", "b1"] + [f"s{i}" for i in range(12)]
    sampler = PatientSampler(patients, studies, expected_batch_size=7, generator=torch.Generator().manual_seed(0))
    assert sampler.num_patients == 14 and sampler.sample_rate == pytest.approx(0.5)
    draws = [sampler.draw() for _ in range(2000)]
    for batch in draws:
        owners = [patients[i] for i in batch]
        assert len(owners) == len(set(owners))
    sizes = torch.tensor([len(b) for b in draws], dtype=torch.float)
    assert float(sizes.mean()) == pytest.approx(7.0, abs=0.2)
    assert float(sizes.var()) == pytest.approx(14 * 0.5 * 0.5, rel=0.15)     # Poisson (binomial) size
    a_studies = [studies[i] for b in draws for i in b if patients[i] == "a"]
    assert {s: a_studies.count(s) / len(a_studies) for s in ("a1", "a2", "a3")} == pytest.approx(
        {"a1": 1 / 3, "a2": 1 / 3, "a3": 1 / 3}, abs=0.06)


# -- 3. accountant, ledger, budget -----------------------------------------------------------------------
def test_accountant_matches_opacus_and_composes_rounds_not_epsilons():
    noise, rate, steps, delta = 1.1, 0.02, 300, 1e-5
    stepped = RDPAccountant()
    for _ in range(steps):
        stepped.step(noise_multiplier=noise, sample_rate=rate)
    assert epsilon_spent([(noise, rate, steps)], delta) == pytest.approx(stepped.get_epsilon(delta), rel=1e-9)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    direct, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=rate, noise_multiplier=noise, steps=steps,
                                                                  orders=orders), delta=delta)
    assert epsilon_spent([(noise, rate, steps)], delta) == pytest.approx(direct, rel=1e-6)

    prv = PRVAccountant()
    for _ in range(steps):
        prv.step(noise_multiplier=noise, sample_rate=rate)
    assert epsilon_spent([(noise, rate, steps)], delta, "prv") == pytest.approx(prv.get_epsilon(delta), rel=1e-3)

    one_round = epsilon_spent([(noise, rate, steps // 3)], delta)
    three_rounds = epsilon_spent([(noise, rate, steps // 3)] * 3, delta)
    assert three_rounds == pytest.approx(stepped.get_epsilon(delta), rel=1e-9)
    assert one_round < three_rounds < 3 * one_round


def test_ledger_survives_a_restart_and_composes_across_runs(tmp_path):
    catalog = tmp_path / "catalog.sqlite"
    caps = {"max_epsilon": 50.0, "max_delta": 1e-5}
    script = textwrap.dedent(f"""
        from client.privacy import PrivacyLedger
        ledger = PrivacyLedger({str(catalog)!r}, "A")
        for r in (1, 2):
            ledger.charge("run-1", r, (1.0, 0.05, 40), {caps!r})
        ledger.close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=PROJECT_ROOT, timeout=120)

    ledger = PrivacyLedger(catalog, "A")  # a new process, a reopened catalog
    assert PrivacyLedger(catalog, "B").history() == []   # another site sharing the catalog has its own ledger
    assert ledger.history() == [(1.0, 0.05, 40), (1.0, 0.05, 40)]
    after_run_1 = ledger.epsilon(1e-5)
    assert after_run_1 == pytest.approx(epsilon_spent([(1.0, 0.05, 80)], 1e-5), rel=1e-9)
    charge = ledger.charge("run-2", 1, (2.0, 0.1, 30), caps)
    assert charge.epsilon_run == pytest.approx(epsilon_spent([(2.0, 0.1, 30)], 1e-5))
    assert charge.epsilon_total == pytest.approx(epsilon_spent([(1.0, 0.05, 80), (2.0, 0.1, 30)], 1e-5))
    assert charge.epsilon_total < after_run_1 + charge.epsilon_run
    rows = ledger.rows()
    assert [(r.run_id, r.round) for r in rows] == [("run-1", 1), ("run-1", 2), ("run-2", 1)]
    assert rows[-1].epsilon_total == pytest.approx(charge.epsilon_total)
    ledger.close()


def test_ledger_lives_in_the_site_files_ledger_else_its_catalog_else_its_state_dir(tmp_path):
    from client.privacy.training import ledger_location
    site = {"name": "A", "state_dir": str(tmp_path / "state"), "catalog": str(tmp_path / "catalog.sqlite"),
            "ledger": str(tmp_path / "run" / "sites" / "A" / "ledger.sqlite")}
    assert ledger_location(site) == site["ledger"] and (tmp_path / "run" / "sites" / "A").is_dir()
    assert ledger_location({**site, "ledger": None}) == site["catalog"]
    assert ledger_location({**site, "ledger": None, "catalog": None}) == str(tmp_path / "state" / "ledger.sqlite")
    with pytest.raises(PrivacyError, match="nowhere to keep its ledger"):
        ledger_location({"name": "A"})


def test_over_budget_charge_is_refused_and_not_recorded(tmp_path):
    ledger = PrivacyLedger(tmp_path / "catalog.sqlite", "A")
    spend = (1.0, 0.1, 50)
    one, two = (epsilon_spent([spend] * k, 1e-5) for k in (1, 2))
    caps = {"max_epsilon": round((one + two) / 2, 3), "max_delta": 1e-5}   # room for one round, not two
    ledger.charge("r", 1, spend, caps)
    with pytest.raises(BudgetExceeded, match=f"max_epsilon={caps['max_epsilon']:g}"):
        ledger.charge("r", 2, spend, caps)
    assert ledger.history() == [spend]
    ledger.close()


class ToyPatients(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.samples = toy_samples(n, seed=5)
        self.patient_ids = [f"p{i // 2}" for i in range(n)]   # two studies per patient
        self.study_ids = [f"s{i}" for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _round(site, run_caps=None, noise=1.0, steps=3, model=None):
    model = model or TwoTower({"tag": 1.0, "global": 1.0})
    settings = TrainSettings(steps=steps, batch_size=4, lr=1e-2, warmup_steps=0, amp=False, grad_clip=None)
    dpsgd = {"noise_multiplier": noise, "max_grad_norm": 1.0, "coupled_max_grad_norm": 0.5}
    return model, dp_train_round(model, ToyPatients(24), toy_collate, settings, dpsgd, site, "run-a", 1,
                                 planned_steps=steps, run_caps=run_caps)


def test_dp_round_trains_charges_the_ledger_first_and_sends_only_public_scalars(tmp_path):
    site = {"name": "A", "catalog": str(tmp_path / "c.sqlite"), "privacy": {"max_epsilon": 8.0, "max_delta": 1e-5},
            "public_patient_count": 12}
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in TwoTower({}).state_dict().items()}
    torch.manual_seed(0)
    model, result = _round(site)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.sample_rate == pytest.approx(4 / 12)
    ledger = PrivacyLedger(site["catalog"], "A")
    assert ledger.history() == [(1.0, pytest.approx(4 / 12), 3)]
    assert result.public_metrics()["epsilon"] == pytest.approx(ledger.epsilon(1e-5))
    ledger.close()
    public = result.public_metrics()
    assert set(public) == {"epsilon", "epsilon_total", "delta", "noise_multiplier", "sample_rate", "steps", "examples"}
    assert public["examples"] == pytest.approx(3 * 4.0)     # expected, not the realised count
    assert "loss" in result.local_metrics and "loss" not in public


def test_round_over_the_site_budget_is_refused_before_training(tmp_path):
    site = {"name": "A", "catalog": str(tmp_path / "c.sqlite"), "privacy": {"max_epsilon": 0.5, "max_delta": 1e-5},
            "public_patient_count": 12}
    torch.manual_seed(0)
    model = TwoTower({"tag": 1.0})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # A run config asking for a looser cap does not loosen the site's.
    with pytest.raises(BudgetExceeded, match="max_epsilon=0.5"):
        _round(site, run_caps={"max_epsilon": 100.0, "max_delta": None}, noise=0.8, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert PrivacyLedger(site["catalog"], "A").history() == []
    # A run config may tighten: the same round within the site's cap is refused under the run's lower one.
    site["privacy"]["max_epsilon"] = 50.0
    _round(site, noise=0.8)
    with pytest.raises(BudgetExceeded, match="max_epsilon=0.01"):
        _round(site, run_caps={"max_epsilon": 0.01}, noise=0.8)


def test_target_epsilon_sets_the_noise_for_the_planned_steps():
    dp = DpSgdSettings(noise_multiplier=None, target_epsilon=3.0)
    noise = dp.noise(1e-5, 0.05, 200)
    assert epsilon_spent([(noise, 0.05, 200)], 1e-5) <= 3.0
    assert epsilon_spent([(noise * 0.97, 0.05, 200)], 1e-5) > epsilon_spent([(noise, 0.05, 200)], 1e-5)


# -- 4. config rules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [["privacy=none"], ["privacy=dpsgd"], ["privacy=central_dp"], ["privacy=secagg"],
                                       ["privacy=dpsgd_secagg", "federation.strategy=fedadam"],
                                       ["privacy=dpsgd_central_dp"], ["privacy=dpsgd", "federation.strategy=median"]])
def test_valid_privacy_configs_pass(overrides):
    validate_privacy_config(compose(overrides))


@pytest.mark.parametrize("overrides, reason", [
    (["privacy=secagg", "federation.strategy=median"], "needs every update on its own"),
    (["privacy=dpsgd_secagg", "federation.strategy=trimmed_mean"], "needs every update on its own"),
    (["privacy=secagg", "federation.update_norm_action=reject"], "cannot check them one by one"),
    (["privacy=secagg", "federation.min_sites=1"], "at least 2 sites"),
    (["privacy=central_dp", "federation.strategy=fedadam"], "unweighted mean"),
    (["privacy=central_dp", "+privacy.secagg={num_shares: 3, reconstruction_threshold: 2}"], "in the clear"),
    (["privacy=dpsgd", "privacy.dpsgd.noise_multiplier=0"], "noise_multiplier > 0"),
    (["privacy=dpsgd", "train.grad_accum=2"], "grad_accum must be 1"),
])
def test_impossible_privacy_configs_are_refused_with_the_reason(overrides, reason):
    with pytest.raises(ValueError, match=reason):
        validate_privacy_config(compose(overrides))
