"""One site on N processes (client/distributed.py): patient-disjoint shards, and a 2-process DDP run (gloo,
127.0.0.1) that equals the 1-process run with the same global batch, loss and updated weights, for `clip` and
`hybrid` — which it does only because the contrastive terms gather every rank's embeddings."""
from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch import nn

from client import distributed
from client.trainer import TrainSettings, train_steps
from shared_models.batch import collate
from shared_models.config import compose
from shared_models.factory import create_model
from shared_models.vocab import OBSERVATIONS, REGIONS, ZONE_ATLAS

SIZE, MAX_LENGTH, GLOBAL_BATCH = 64, 48, 16
FAST = [f"model.image.img_size={SIZE}", "model.image.kwargs.depth=2", f"model.text.max_length={MAX_LENGTH}",
        "model.text.tokenizer.num_reports=300", "model.projection_head=linear"]  # linear: no BatchNorm


def test_patient_shards_are_disjoint_cover_every_image_and_balance():
    patients = [f"p{i // 3}" for i in range(30)] + [f"q{i}" for i in range(7)]  # 10 patients x 3 images, 7 x 1
    shards = distributed.patient_shards(patients, world=3, seed=5)
    assert sorted(i for shard in shards for i in shard) == list(range(len(patients)))
    owners = [{patients[i] for i in shard} for shard in shards]
    assert all(not (owners[a] & owners[b]) for a in range(3) for b in range(a + 1, 3))
    assert max(map(len, shards)) - min(map(len, shards)) <= 3  # within one patient's images
    assert shards == distributed.patient_shards(patients, world=3, seed=5)  # every rank computes the same deal
    assert shards != distributed.patient_shards(patients, world=3, seed=6)
    sampler = distributed.PatientShardSampler(patients, rank=1, world=3, seed=5)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == sorted(shards[1]) and first != second  # reshuffled each pass


# -- 2 x 8 against 1 x 16 ----------------------------------------------------------------------------------------
# Every study has the same token counts, sentence count and no uncertain tag, so the per-study terms' token and
# row means over each rank's half are the means over the whole batch: only the gather can make the runs differ.
FINDINGS = [("There is a small left pleural effusion.", "There is a small right pleural effusion."),
            ("Heart size is normal.", "The lungs are clear.")]
IMPRESSIONS = ("No pneumothorax.", "Mild cardiomegaly.", "Moderate edema.")


def make_sample(i: int) -> dict:
    sentences = [FINDINGS[0][i % 2], FINDINGS[1][(i // 2) % 2], IMPRESSIONS[i % 3]]
    tags = torch.zeros(len(OBSERVATIONS))
    tags[OBSERVATIONS.index("pleural_effusion")] = float(i % 2 == 0)
    tags[OBSERVATIONS.index("cardiomegaly")] = float(i % 3 == 1)
    return {
        "image": torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(i)),
        "patient_id": f"p{i}", "study_id": f"s{i}", "image_id": f"i{i}",
        "findings": " ".join(sentences[:2]), "impression": sentences[2], "report": " ".join(sentences),
        "sentences": sentences, "sentence_sections": ["findings", "findings", "impression"],
        "sentence_regions": [REGIONS.index("left_costophrenic_angle"), REGIONS.index("heart"),
                             REGIONS.index("right_lung")],
        "tags": tags, "labels": torch.zeros(14), "boxes": torch.tensor([ZONE_ATLAS[r] for r in REGIONS]),
    }


def without_dropout(model: nn.Module) -> nn.Module:
    """Dropout draws differ between 2 ranks and 1 process; with it off a training step is deterministic."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
        if hasattr(module, "dropout_prob"):  # Hugging Face attention's functional dropout
            module.dropout_prob = 0.0
    return model


SETTINGS = TrainSettings(steps=2, batch_size=GLOBAL_BATCH, lr=1e-3, warmup_steps=0, grad_clip=1.0, amp=False)


def train(model: nn.Module, samples: list[dict]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=MAX_LENGTH)
    settings = replace(SETTINGS, nproc=distributed.world_size())
    result = train_steps(model, samples, collate_fn, settings, progress=False)
    return result.history, {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_on_ranks(builds: dict[str, tuple], samples: list[dict]) -> dict | None:
    """A worker of `distributed.run`: train each (config, initial weights) on this rank's half, with the gather and
    then without it (the control arm: each rank's objectives see only its own rows); rank 0 returns both."""
    results = {}
    gathering = distributed.gathering
    models = {name: create_model(cfg) for name, (cfg, _) in builds.items()}  # built here: a pickled Hugging
    for arm, gather in (("gathered", distributed.gather_rows), ("control", lambda rows: rows)):  # Face model
        distributed.gathering = partial(gathering, gather=gather)  # loses its eager attention (and attentions)
        for name, (_, weights) in builds.items():
            models[name].load_state_dict(weights)
            results[arm, name] = train(without_dropout(models[name]), samples)
    return results if distributed.is_main() else None


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def runs():
    """The 1-process runs here, then one 2-process group for the gathered and one for the control arm."""
    samples = [make_sample(i) for i in range(GLOBAL_BATCH)]
    models, cfgs = {}, {}
    for objective in ("clip", "hybrid"):
        torch.manual_seed(0)
        cfgs[objective] = compose([*FAST, f"objective={objective}"])
        models[objective] = without_dropout(create_model(cfgs[objective]))
    batch = collate(samples, models["hybrid"].tokenizer, MAX_LENGTH)
    for key in ("report_mask", "impression_mask"):  # the precondition of the comment above
        assert len(set(batch[key].sum(1).tolist())) == 1, key
    assert len(set((batch["report_sections"] == 1).sum(1).tolist())) == 1   # as many findings words in each
    before = {name: copy.deepcopy(model.state_dict()) for name, model in models.items()}
    single = {name: train(model, samples) for name, model in models.items()}
    builds = {name: (cfgs[name], before[name]) for name in models}
    return before, single, distributed.run(train_on_ranks, (builds, samples), nproc=2)


@pytest.mark.parametrize("objective", ["clip", "hybrid"])
def test_two_processes_equal_one_process_with_the_same_global_batch(runs, objective):
    before, single, ranks = runs
    (history_1, weights_1), (history_2, weights_2) = single[objective], ranks["gathered", objective]
    loss_difference = max(abs(a[t] - b[t]) for a, b in zip(history_1, history_2) for t in a)
    weight_difference = max_abs_difference(weights_1, weights_2)
    print(f"{objective}: max |loss 2x8 - loss 1x16| = {loss_difference:.2e}, max |weights| = {weight_difference:.2e}")
    assert history_1[0].keys() == history_2[0].keys()
    assert loss_difference < 1e-4
    # AdamW divides by sqrt(v): on weights whose gradients are near 0 it turns float noise into a visible part
    # of a step (lr = 1e-3 moves a weight up to 2e-3 in 2 steps); measured 1.8e-5 (clip), 1.0e-5 (hybrid).
    assert weight_difference < 5e-5
    assert max_abs_difference(weights_1, before[objective]) > 1e-4  # it did train

    # Without the gather each rank's contrastive terms see 8 of the 16 studies: another loss, other weights.
    history_c, weights_c = ranks["control", objective]
    assert abs(history_c[0]["global"] - history_1[0]["global"]) > 0.1
    control_difference = max_abs_difference(weights_1, weights_c)
    print(f"{objective} without the gather: loss {history_c[0]['loss']:.4f} vs {history_1[0]['loss']:.4f}, "
          f"max |weights| = {control_difference:.2e}")
    assert control_difference > 10 * 5e-5



def test_nproc_outside_a_worker_group_is_refused():
    """A federated site trains in one process: train.nproc=2 there must stop, not silently train on one."""
    model = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="simulations.centralized"):
        train_steps(model, [], lambda rows: rows, replace(SETTINGS, nproc=2), progress=False)


def test_dp_sgd_refuses_more_processes_outside_a_worker_group():
    """A DP run asked for 2 processes outside the worker group stops instead of training 1 without saying."""
    from client.privacy.clipping import PrivacyError
    from client.privacy.training import dp_train_steps

    with pytest.raises(PrivacyError, match="train.nproc=2 but this process trains in a group of 1"):
        dp_train_steps(nn.Linear(1, 1), [], lambda rows: rows, replace(SETTINGS, nproc=2), clip=None,
                       noise_multiplier=1.0, sampler=None, progress=False)


# -- DP-SGD on 2 ranks: the 1-process S(B), one noise draw, one ledger charge ---------------------------------
DP_BATCH = 7   # shares of 4 and 3: the gather of uneven shares is exercised
DP_CLIP = (0.02, 0.01)  # C, C_b: small enough that every per-patient summand and the coupled gradient are clipped


def dp_model():
    from tests.test_privacy import HYBRID_FAST
    return without_dropout(create_model(compose([*HYBRID_FAST, f"model.image.img_size={SIZE}"])))


def dp_sum(model, samples, clip, per_study, group_counts=None):
    from client.privacy.clipped_sum import clipped_gradient_sum
    collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=48)
    summed = clipped_gradient_sum(model, samples, collate_fn, 0, clip, coupled_scale=DP_BATCH, per_study=per_study,
                                  group_counts=group_counts)
    return torch.cat([g.flatten() for g in summed.gradient])


def across_ranks(flat: torch.Tensor) -> float:
    """max |this rank's tensor - rank 0's| over the ranks."""
    theirs = distributed.broadcast_([flat.clone()])[0]
    gap = torch.tensor([float((flat - theirs).abs().max())])
    torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
    return float(gap)


def dp_on_ranks(weights: dict, samples: list[dict], site: dict) -> dict | None:
    """A worker: (a) the clipped sum of this rank's share, both per-patient methods; (b) one noised gradient with
    C, C_b tiny (nearly all noise); (c) a 2-step DP round with a ledger."""
    from client.privacy import ClipNorms, dp_train_round
    from client.privacy.sampling import secret_generator
    from client.privacy.training import private_gradient
    from tests.test_privacy import ToyPatients, TwoTower, toy_collate

    model = dp_model()
    model.load_state_dict(weights)
    model.eval()   # fixed masks: the 1-process sum and the ranks' see one function
    shares = distributed.contiguous_shares(len(samples), distributed.world_size())
    mine = [samples[i] for i in shares[distributed.rank()]]
    out = {}
    for per_study in ("vmap", "loop"):
        flat = dp_sum(model, mine, ClipNorms(*DP_CLIP), per_study, group_counts=[len(s) for s in shares])
        out["sum", per_study] = flat, across_ranks(flat)

    tiny = ClipNorms(1e-4, 1e-4)
    noise_std = 1.0 * tiny.sensitivity
    collate_fn = partial(collate, tokenizer=model.tokenizer, max_length=48)
    gradient, _ = private_gradient(model, samples, collate_fn, 0, tiny, 1.0, list(model.parameters()), noise_std,
                                   secret_generator())
    flat = torch.cat([g.flatten() for g in gradient]).double()
    out["noise"] = float(flat.pow(2).mean()) / noise_std ** 2, flat.numel(), across_ranks(flat.float())

    class Gathered(TwoTower):   # the toy's objectives as submodules, where `gathering` finds them
        def __init__(self, lambdas):
            super().__init__(lambdas)
            self.objectives = nn.ModuleDict(self.COUPLED)

    torch.manual_seed(0)
    toy = Gathered({"tag": 1.0, "global": 1.0})
    start = torch.cat([p.detach().flatten() for p in toy.parameters()])
    settings = TrainSettings(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, amp=False, grad_clip=None, nproc=2)
    dpsgd = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "coupled_max_grad_norm": 0.5}
    result = dp_train_round(toy, ToyPatients(24), toy_collate, settings, dpsgd, site, "run-a", 1, planned_steps=2)
    end = torch.cat([p.detach().flatten() for p in toy.parameters()])
    out["round"] = result, float((end - start).abs().max()), across_ranks(end)
    return out if distributed.is_main() else None


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    from client.privacy import ClipNorms
    samples = [make_sample(i) for i in range(DP_BATCH)]
    torch.manual_seed(0)
    model = dp_model().eval()
    single = {m: dp_sum(model, samples, ClipNorms(*DP_CLIP), m) for m in ("vmap", "loop")}
    single["unclipped coupled"] = dp_sum(model, samples, ClipNorms(DP_CLIP[0], 1e9), "vmap")
    site = {"name": "A", "ledger": str(tmp_path_factory.mktemp("dp") / "ledger.sqlite"),
            "privacy": {"max_epsilon": 50.0, "max_delta": 1e-5}, "public_patient_count": 12}
    return single, distributed.run(dp_on_ranks, (model.state_dict(), samples, site), nproc=2), site


@pytest.mark.parametrize("per_study", ["vmap", "loop"])
def test_dp_clipped_sum_on_two_ranks_is_the_one_process_sum(dp_runs, per_study):
    """Shares of 4 and 3 patients, the coupled terms (hybrid: global, soft_label, ...) gathered and clipped once
    over the global batch: the 1-process S(B) on every rank."""
    single, ranks, _ = dp_runs
    flat, rank_gap = ranks["sum", per_study]
    difference = float((flat - single[per_study]).abs().max())
    print(f"DP S(B) {per_study}: max |2 ranks - 1 process| = {difference:.2e} (|S(B)|max {single[per_study].abs().max():.2e}),"
          f" between ranks {rank_gap:.1e}")
    assert rank_gap == 0.0
    assert difference < 1e-6
    # the coupled clip is active (C_b moves S(B)), so a per-rank clip of the coupled part would show
    assert float((single["vmap"] - single["unclipped coupled"]).abs().max()) > 100 * 1e-6


def test_dp_noise_is_added_once_for_the_group(dp_runs):
    """One step on 2 ranks with C = C_b = 1e-4: the data's part of the gradient has norm <= 3e-4 over ~1e5+
    coordinates, so the per-coordinate variance is the noise's: sigma^2 (C + 2 C_b)^2 for one draw, twice that if
    each rank added its own. The estimate over d coordinates has relative s.d. sqrt(2/d) (< 1 % here)."""
    _, ranks, _ = dp_runs
    ratio, coordinates, rank_gap = ranks["noise"]
    print(f"DP noise on 2 ranks: variance / (sigma (C + 2 C_b))^2 = {ratio:.4f} over {coordinates} coordinates "
          f"(one draw: 1, one per rank: 2)")
    assert coordinates > 50_000
    assert rank_gap == 0.0   # every rank steps with the same (rank 0's, broadcast) gradient
    assert abs(ratio - 1.0) < 0.1


def test_dp_round_on_two_ranks_charges_the_ledger_once_at_the_global_rate(dp_runs):
    from client.privacy import PrivacyLedger
    _, ranks, site = dp_runs
    result, moved, rank_gap = ranks["round"]
    assert result.sample_rate == pytest.approx(4 / 12)   # the global batch over the public count, not 2 / 12
    assert result.train.steps == 2 and moved > 1e-4 and rank_gap == 0.0   # trained, one model on both ranks
    ledger = PrivacyLedger(site["ledger"], "A")
    try:
        assert [(r.run_id, r.round) for r in ledger.rows()] == [("run-a", 1)]
        assert ledger.history() == [(1.0, pytest.approx(4 / 12), 2)]
    finally:
        ledger.close()


def test_a_site_with_nproc_2_trains_a_dp_round_on_two_processes(tmp_path):
    """The site file's `nproc: 2`: `train_round` (what the ClientApp calls) starts a 2-rank group, which trains the
    DP round and charges the ledger once; rank 0's weights and public scalars are the reply."""
    from client.federated import shared_arrays, train_round
    from client.privacy import PrivacyLedger
    from server.rounds import round_config
    from shared_models.checkpoint import checkpoint_fingerprints
    from simulations.deployment import phantom_site_fields

    cfg = compose(["privacy=dpsgd", "federation.rounds=2", "federation.local_steps=1", "train.batch_size=2",
                   *FAST[:3]])
    model = create_model(cfg, seed=int(cfg.seed))
    shared = shared_arrays(model, cfg)
    site = dict(phantom_site_fields(tmp_path / "phantom")["A"], name="A", state_dir=str(tmp_path / "A"),
                device="cpu", privacy={"max_epsilon": 8.0, "max_delta": 1e-5}, public_patient_count=10,
                ledger=str(tmp_path / "ledger.sqlite"), nproc=2)
    config = round_config(cfg, 1, "dp", checkpoint_fingerprints(cfg, model.tokenizer))
    new_shared, examples, metrics = train_round(shared, config, site, "dp", cfg)
    assert set(metrics) == {"epsilon", "epsilon_total", "delta", "noise_multiplier", "sample_rate", "steps"}
    assert metrics["sample_rate"] == pytest.approx(2 / 10) and examples == pytest.approx(2.0)
    assert any(not (new_shared[k] == shared[k]).all() for k in shared)
    assert (tmp_path / "A" / "runs" / "dp" / "local.safetensors").is_file()
    ledger = PrivacyLedger(site["ledger"], "A")
    try:
        assert [(r.run_id, r.round) for r in ledger.rows()] == [("dp", 1)]   # one charge for the two ranks
    finally:
        ledger.close()
