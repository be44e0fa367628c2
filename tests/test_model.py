"""Encoders, tokenizer, collate, the composed pre-training model and parameter sharing (tiny random-init models)."""
import copy
import re
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from omegaconf import OmegaConf

from shared_models.batch import SECTIONS, collate
from shared_models.checkpoint import load_checkpoint, save_checkpoint
from shared_models.config import RenamedKeyError, compose
from shared_models.factory import create_model
from shared_models.image_encoder import ImageEncoder
from shared_models.model import schedule_notice, terms_never_trained
from server.rounds import hybridmed_stage
from shared_models.objectives.registry import objective_of_term, objectives
from shared_models.objectives.schedule import federation_steps, resolve_schedule
from shared_models.sharing import shared_parameter_names, split_state
from shared_models.text_encoder import TextEncoder, sentence_means
from shared_models.tokenizer import tokenizer_hash, train_wordpiece
from shared_models.vocab import OBSERVATIONS, REGIONS, ZONE_ATLAS

SIZE = 64
FAST = [f"model.image.img_size={SIZE}", "model.image.kwargs.depth=2", "model.text.max_length=48",
        "model.text.tokenizer.num_reports=300"]
SENTENCES = [
    ("There is a small left pleural effusion.", "findings", REGIONS.index("left_costophrenic_angle")),
    ("Heart size is normal.", "findings", REGIONS.index("heart")),
    ("The lungs are clear.", "findings", -1),
    ("No pneumothorax.", "impression", REGIONS.index("right_lung")),
]


def make_sample(i: int, findings: bool = True, impression: bool = True) -> dict:
    chosen = [s for s in SENTENCES if (s[1] == "findings" and findings) or (s[1] == "impression" and impression)]
    chosen = chosen[i % 2:] if len(chosen) > 2 else chosen  # vary the sentence count across the batch
    find = " ".join(t for t, sec, _ in chosen if sec == "findings")
    imp = " ".join(t for t, sec, _ in chosen if sec == "impression")
    tags = torch.zeros(len(OBSERVATIONS))
    tags[OBSERVATIONS.index("pleural_effusion")] = 1.0 if i % 2 == 0 else 0.0
    tags[OBSERVATIONS.index("cardiomegaly")] = -1.0 if i % 3 == 0 else 1.0
    generator = torch.Generator().manual_seed(i)
    return {
        "image": torch.rand(1, SIZE, SIZE, generator=generator),
        "patient_id": f"p{i}", "study_id": f"s{i}", "image_id": f"i{i}",
        "findings": find, "impression": imp, "report": f"{find} {imp}".strip(),
        "sentences": [t for t, _, _ in chosen], "sentence_sections": [sec for _, sec, _ in chosen],
        "sentence_regions": [r for _, _, r in chosen],
        "tags": tags, "labels": torch.zeros(14),
        "boxes": torch.tensor([ZONE_ATLAS[r] for r in REGIONS]),
    }


def hybrid_cfg(*extra: str):
    return compose([*FAST, "objective=hybrid", "objective.schedule.stage2_step=10",
                    "objective.schedule.seg_start_step=5", *extra])


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return create_model(hybrid_cfg())


@pytest.fixture(scope="module")
def batch(hybrid):
    return collate([make_sample(i) for i in range(4)], hybrid.tokenizer, max_length=48)


# -- encoders -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs, grid, dim, pyramid",
    [
        ("resnet18", {}, (2, 2), 512, [(64, 16), (128, 8), (256, 4), (512, 2)]),
        ("vit_tiny_patch16_224", {"depth": 2}, (4, 4), 192, [(192, 4)] * 2),
    ],
)
def test_image_encoder_shapes(name, kwargs, grid, dim, pyramid):
    encoder = ImageEncoder(name, img_size=SIZE, kwargs=kwargs, pool_heads=4, pyramid_levels=4)
    out = encoder(torch.rand(3, 1, SIZE, SIZE))
    n = grid[0] * grid[1]
    assert out.grid_hw == grid
    assert out.global_emb.shape == (3, dim) and out.patch_tokens.shape == (3, n, dim)
    assert [(p.shape[1], p.shape[2]) for p in out.pyramid] == pyramid
    assert encoder.pyramid_channels == [c for c, _ in pyramid]
    heads = out.pool_attention.shape[1]
    assert out.pool_attention.shape == (3, heads, n)
    torch.testing.assert_close(out.patch_weights, out.pool_attention.mean(dim=1))
    # Attention over the grid: non-negative and at most 1 (the rest goes to the query/CLS token itself).
    assert (out.patch_weights >= 0).all() and (out.patch_weights.sum(-1) <= 1 + 1e-5).all()
    assert encoder.timm_kwargs["num_classes"] == 0 and encoder.timm_kwargs["in_chans"] == 1
    assert ("img_size" in encoder.timm_kwargs) == name.startswith("vit")


def test_vit_patch_weights_equal_timm_attention():
    encoder = ImageEncoder("vit_tiny_patch16_224", img_size=SIZE, kwargs={"depth": 2}).eval()
    attn = encoder.model.blocks[-1].attn
    attn.fused_attn = False  # timm's explicit path passes the softmax through attn_drop: observe it there
    seen = []
    attn.attn_drop.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    out = encoder(torch.rand(2, 1, SIZE, SIZE))
    torch.testing.assert_close(out.pool_attention, seen[-1][:, :, 0, 1:])


def test_vit_patch_weights_are_each_threads_own_when_two_threads_run_forward_at_once():
    """The DP loop runs studies on several threads through one encoder: each study's attention must come from
    its own image. A barrier holds both threads after the last block's input was kept, so that each would read
    the other's if the encoder kept one input for all threads."""
    encoder = ImageEncoder("vit_tiny_patch16_224", img_size=SIZE, kwargs={"depth": 2}).eval()
    images = [torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    alone = [encoder(image).patch_weights for image in images]
    assert not torch.allclose(alone[0], alone[1])
    barrier = threading.Barrier(2, timeout=30)

    def hold(module, args):   # runs after the encoder's own pre-hook kept this thread's input
        barrier.wait()

    encoder.model.blocks[-1].attn.register_forward_pre_hook(hold)
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda image: encoder(image).patch_weights, images))
    for mine, expected in zip(together, alone):
        torch.testing.assert_close(mine, expected)


def test_group_norm_on_a_layer_32_groups_cannot_divide_names_the_model_to_use():
    with pytest.raises(ValueError, match="norm=group .DP-SGD. needs a model whose every layer has a multiple of 32 "
                                         "channels, e.g. model=tiny_cnn"):
        ImageEncoder("resnet10t", img_size=SIZE, norm="group",
                     kwargs={"stem_type": "deep", "stem_width": 16, "channels": [32, 64, 128, 256]})


def test_input_is_normalised_inside():
    encoder = ImageEncoder("vit_tiny_patch16_224", img_size=SIZE, kwargs={"depth": 1}).eval()
    images = torch.rand(1, 1, SIZE, SIZE)
    expected = encoder.model.forward_features((images - 0.5) / 0.5)[:, 0]
    torch.testing.assert_close(encoder(images).global_emb, expected)


def test_group_norm_option_replaces_batch_norm():
    encoder = ImageEncoder("resnet18", img_size=SIZE, norm="group")
    kinds = {type(m) for m in encoder.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert any(issubclass(k, nn.GroupNorm) for k in kinds)
    assert encoder.timm_kwargs["norm_layer"] == "groupnorm"
    assert not any(getattr(m, "inplace", False) is True for m in encoder.modules())
    vit = ImageEncoder("vit_tiny_patch16_224", img_size=SIZE, norm="group", kwargs={"depth": 1})
    assert "norm_layer" not in vit.timm_kwargs  # nothing to replace: LayerNorm stays


def tiny_text(**kwargs) -> TextEncoder:
    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    return TextEncoder(config=config, **kwargs)


def test_frozen_text_layers_get_no_gradient():
    encoder = tiny_text(freeze_layers=1)
    ids = torch.randint(5, 100, (2, 7))
    encoder(ids, torch.ones_like(ids)).token_embeds.pow(2).sum().backward()
    for name, parameter in encoder.named_parameters():
        frozen = ".embeddings." in name or ".layer.0." in name
        assert (parameter.grad is None) == frozen, name
    assert any(".layer.1." in n and p.grad.abs().sum() > 0 for n, p in encoder.named_parameters())


def test_truncated_text_encoder_keeps_first_layers():
    torch.manual_seed(0)
    full = tiny_text()
    torch.manual_seed(0)
    truncated = tiny_text(truncate_layers=1)
    assert len(truncated.model.encoder.layer) == 1 and truncated.model.config.num_hidden_layers == 1
    torch.testing.assert_close(truncated.model.encoder.layer[0].state_dict(), full.model.encoder.layer[0].state_dict())
    with pytest.raises(ValueError, match="truncate_layers"):
        tiny_text(truncate_layers=5)


def test_cnn_encoder_holds_convolutions_channels_last_and_writes_them_out_contiguous(tmp_path):
    cfg = compose(["model=tiny_cnn", f"model.image.img_size={SIZE}", "model.text.max_length=48",
                   "model.text.tokenizer.num_reports=300", "objective=clip"])
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    convs = [p for n, p in model.image_encoder.named_parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert sum(not p.is_contiguous() for p in convs) > len(convs) // 2   # 1-channel and 1x1 kernels are both
    images = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        held = model.encode_image(images)
        plain = copy.deepcopy(model.image_encoder).to(memory_format=torch.contiguous_format)
        assert all(p.is_contiguous() for p in plain.parameters())
        # The layout changes how oneDNN computes, not what: the same embedding either way.
        torch.testing.assert_close(F.normalize(model.image_projection(plain(images).global_emb), dim=-1), held,
                                   rtol=1e-4, atol=1e-5)
    # A checkpoint and the wire (numpy copies) carry the values, and a model loaded from them is channels_last again.
    save_checkpoint(tmp_path / "ckpt", model, cfg)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    loaded.eval()
    assert all(p.is_contiguous(memory_format=torch.channels_last) for n, p in loaded.image_encoder.named_parameters()
               if p.dim() == 4)
    wire = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    assert all(a.flags["C_CONTIGUOUS"] for a in wire.values())
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), held)


def test_text_dropout_setting_sets_every_dropout_of_the_encoder():
    config = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}   # BERT's own rates: 0.1
    ids, mask = torch.randint(3, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    torch.manual_seed(0)
    own = TextEncoder(config=config).train()
    assert not torch.equal(own(ids, mask).token_embeds, own(ids, mask).token_embeds)   # dropout draws differ
    torch.manual_seed(0)
    none = TextEncoder(config=config, dropout=0.0).train()
    assert {m.p for m in none.modules() if isinstance(m, nn.Dropout)} == {0.0}
    torch.testing.assert_close(none(ids, mask).token_embeds, none(ids, mask).token_embeds, rtol=0, atol=0)
    # Same weights, so in eval mode the two encoders agree: the setting changes dropout alone.
    torch.testing.assert_close(own.eval()(ids, mask).token_embeds, none(ids, mask).token_embeds)
    with pytest.raises(ValueError, match="model.text.dropout=1.5"):
        TextEncoder(config=config, dropout=1.5)


def test_tag_decoder_dropout_is_a_setting_and_cpu_quick_turns_it_off():
    """objective.tag.dropout reaches every dropout of the tag decoder; the papers' 0.1 stays the default, an old
    checkpoint's config without the key builds that, and a rate outside [0, 1) is refused."""
    def rates(overrides):   # the tag objective as the factory builds it from the composed config
        tag = objectives()["tag"].build(compose(["objective=hybrid", *overrides]).objective.tag,
                                        types.SimpleNamespace(projection_dim=16))
        return {m.p for m in tag.decoder.modules() if isinstance(m, nn.Dropout)}

    assert rates([]) == {0.1}
    assert rates(["+recipe=cpu_quick"]) == {0.0}
    assert rates(["objective.tag.dropout=0.25"]) == {0.25}
    assert rates(["~objective.tag.dropout"]) == {0.1}
    with pytest.raises(ValueError, match="objective.tag.dropout=1.0"):
        rates(["objective.tag.dropout=1.0"])


def test_text_features_sentences_and_word_weights():
    encoder = tiny_text().eval()
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    sentence_ids = torch.tensor([[-1, 0, 0, 1, 1, -1], [-1, 0, 0, -1, -1, -1]])
    out = encoder(ids, mask, sentence_ids)
    tokens = out.token_embeds
    torch.testing.assert_close(out.sentence_embeds[0, 1], tokens[0, 3:5].mean(0))
    torch.testing.assert_close(out.sentence_embeds[1, 0], tokens[1, 1:3].mean(0))
    assert out.sentence_mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(out.report_emb, tokens[:, 0])
    assert (out.word_weights[1, 4:] == 0).all() and out.word_weights.shape == (2, 6)
    # A softmax row over the real tokens of the CLS query, averaged over heads.
    torch.testing.assert_close(out.word_weights.sum(-1), torch.ones(2))
    padded, padded_mask = sentence_means(tokens, sentence_ids, num_sentences=4)
    assert padded.shape == (2, 4, 32) and not padded_mask[:, 2:].any()


# -- tokenizer and collate ------------------------------------------------------------------------
def test_text_encoder_is_the_hugging_face_model_with_its_own_2d_mask(hybrid, batch):
    encoder = hybrid.text_encoder.eval()
    try:
        ids, mask = batch["report_ids"], batch["report_mask"]
        assert not bool(mask.all())   # the batch has padding
        ours = encoder(ids, mask)
        theirs = encoder.model(input_ids=ids, attention_mask=mask, output_attentions=True)
        padded = ~mask.bool()
        torch.testing.assert_close(ours.token_embeds[~padded], theirs.last_hidden_state[~padded])
        torch.testing.assert_close(ours.word_weights, theirs.attentions[-1][:, :, 0, :].mean(dim=1) * mask)
    finally:
        encoder.train()


def test_tokenizer_is_deterministic_and_covers_text():
    first, second = train_wordpiece(num_reports=300), train_wordpiece(num_reports=300)
    assert tokenizer_hash(first) == tokenizer_hash(second)
    assert tokenizer_hash(first) != tokenizer_hash(train_wordpiece(num_reports=300, vocab_size=150))
    ids = first("Pneumothorax: 2.5 cm, per Dr. X!", add_special_tokens=False)["input_ids"]
    assert first.unk_token_id not in ids
    assert first.decode(first("the lungs are clear.")["input_ids"], skip_special_tokens=True) == "the lungs are clear."


def test_collate_tracks_sentence_spans(hybrid):
    tokenizer = hybrid.tokenizer
    samples = [make_sample(0), make_sample(1)]
    out = collate(samples, tokenizer, max_length=48)
    for row, sample in enumerate(samples):
        ids, sids = out["report_ids"][row], out["sentence_ids"][row]
        assert ids[0] == tokenizer.cls_token_id
        for index, sentence in enumerate(sample["sentences"]):
            expected = tokenizer(sentence, add_special_tokens=False)["input_ids"]
            assert ids[sids == index].tolist() == expected
        regions = out["sentence_regions"][row].tolist()
        n = len(sample["sentences"])
        assert regions[:n] == sample["sentence_regions"] and all(r == -1 for r in regions[n:])
        assert out["report_mask"][row].sum() == (ids != tokenizer.pad_token_id).sum()
        # Each token's section: its sentence's, 0 on [CLS], [SEP] and padding.
        sections = out["report_sections"][row]
        for index, section in enumerate(sample["sentence_sections"]):
            assert set(sections[sids == index].tolist()) == {SECTIONS[section]}
        assert (sections[sids == -1] == 0).all() and sections[0] == 0
    # Truncation: a sentence left without tokens loses its region too.
    short = collate(samples, tokenizer, max_length=6)
    kept = set(short["sentence_ids"][0].tolist()) - {-1}
    assert short["report_ids"].shape[1] == 6
    assert all((r == -1) for i, r in enumerate(short["sentence_regions"][0].tolist()) if i not in kept)


def test_collate_marks_missing_sections(hybrid):
    out = collate([make_sample(0, impression=False), make_sample(1, findings=False)], hybrid.tokenizer, 48)
    assert out["has_findings"].tolist() == [True, False] and out["has_impression"].tolist() == [False, True]
    empty = make_sample(2)
    empty.update(report="  ", sentences=[], sentence_sections=[], sentence_regions=[])
    with pytest.raises(ValueError, match="i2"):
        collate([empty], hybrid.tokenizer, 48)
    unpaired = make_sample(3)
    unpaired["sentence_regions"] = unpaired["sentence_regions"][:-1]
    with pytest.raises(ValueError, match="pair one to one"):
        collate([unpaired], hybrid.tokenizer, 48)
    unsectioned = make_sample(4)
    del unsectioned["sentence_sections"]
    with pytest.raises(ValueError, match="'i4' has 4 sentences but 0 sentence_sections"):
        collate([unsectioned], hybrid.tokenizer, 48)
    misnamed = make_sample(5)
    misnamed["sentence_sections"][0] = "history"
    with pytest.raises(ValueError, match=r"'i5' has sentences of sections \['history'\]"):
        collate([misnamed], hybrid.tokenizer, 48)


def test_findings_words_are_encoded_apart_from_the_impression(hybrid):
    """The findings words come off the report pass; they must carry nothing of the impression (the summarisation
    branch predicts it from them), while the report embedding reads both sections."""
    hybrid.eval()   # no dropout: the two passes below differ only in their input
    try:
        same = make_sample(0)
        other = {**same, "sentences": [*same["sentences"][:-1], "Moderate edema."],
                 "impression": "Moderate edema."}
        batch = collate([same, other], hybrid.tokenizer, 48)
        assert batch["report_ids"][0].tolist() != batch["report_ids"][1].tolist()
        with torch.no_grad():
            inputs = hybrid.step_inputs(batch)
            words = inputs.word_mask
            assert words[0].tolist() == words[1].tolist() and int(words[0].sum()) > 5
            torch.testing.assert_close(inputs.findings_tokens[0][words[0]], inputs.findings_tokens[1][words[1]])
            assert not torch.allclose(inputs.report_emb[0], inputs.report_emb[1], atol=1e-4)
            # Encoded whole (as clip does), the findings words would see the impression.
            whole = hybrid.text_encoder(batch["report_ids"], batch["report_mask"]).token_embeds
            assert not torch.allclose(whole[0][words[0]], whole[1][words[1]], atol=1e-4)
    finally:
        hybrid.train()
    assert hybrid.reads_findings
    assert not create_model(compose([*FAST, "objective=clip"])).reads_findings


def test_sample_order_keeps_regions_with_their_image(hybrid):
    samples = [make_sample(i) for i in range(3)]
    order = [2, 0, 1]
    forward = collate(samples, hybrid.tokenizer, 48)
    shuffled = collate([samples[i] for i in order], hybrid.tokenizer, 48)
    for key in ("images", "boxes", "sentence_regions", "tags"):
        torch.testing.assert_close(shuffled[key], forward[key][order])


# -- composition ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["clip", "hybridmed", "asg", "g2d", "hybrid"])
def test_preset_total_is_weighted_sum(preset, batch):
    cfg = compose([*FAST, f"objective={preset}"])
    model = create_model(cfg)
    step = 10_000  # past every warm-up and stage switch
    out = model(batch, step=step)
    lambdas = {k: v for k, v in cfg.objective.lambdas.items() if v > 0}
    assert set(out) - {"loss"} == set(lambdas)
    expected = sum(lambdas[term] * out[term] for term in lambdas)
    torch.testing.assert_close(out["loss"], expected)
    assert all(torch.isfinite(v) and v.requires_grad for v in out.values())


def test_schedules_switch_terms(hybrid):
    assert set(hybrid.active_terms(0)) == {"global", "summary", "region", "tag", "soft_label"}
    assert set(hybrid.active_terms(5)) == {"global", "summary", "region", "tag", "soft_label", "seg"}
    assert set(hybrid.active_terms(10)) == set(objective_of_term())
    assert (hybrid.hybridmed_stage(9), hybrid.hybridmed_stage(10)) == (1, 2)


def test_terms_never_trained_are_those_starting_at_or_after_the_last_step():
    objective = compose(["objective=hybrid", "objective.schedule.stage2_step=10",
                         "objective.schedule.seg_start_step=5", "objective.lambdas.caption=0"]).objective
    # steps 0..9 are trained: a term starting at step 10 never is, one at step 5 is (unweighted caption: not listed)
    assert terms_never_trained(objective, 10) == {"global_impression": 10, "token": 10, "distill": 10}
    assert terms_never_trained(objective, 11) == {}
    assert terms_never_trained(objective, 5) == {"global_impression": 10, "token": 10, "distill": 10, "seg": 5}
    notice = schedule_notice(objective, 5, "each site")
    assert "seg (from step 5)" in notice and "token (from step 10)" in notice and "stage2_step" in notice
    assert schedule_notice(objective, 11, "each site") is None


class ReadsRecorder:
    """A batch's `StepInputs` that records which encoder outputs and batch keys a loss function reads."""

    class Batch(dict):
        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

    def __init__(self, inputs):
        self._inputs, self.read = inputs, set()
        self.batch = self.Batch(inputs.batch)
        self.batch.read = set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._inputs, name)


def test_each_registered_objective_reads_exactly_what_it_declares(hybrid, batch):
    hybrid.embed_tag_queries_once()   # as `forward` does before any term
    inputs = hybrid.step_inputs(batch)
    for objective in objectives().values():
        recorder = ReadsRecorder(inputs)
        out = objective.loss(hybrid, recorder, 10)   # stage 2: every branch runs
        assert set(out) == set(objective.terms), objective.name
        assert recorder.read == set(objective.inputs), objective.name
        assert recorder.batch.read == set(objective.batch), objective.name


def test_the_default_schedule_is_a_fraction_of_the_run_resolved_once_from_its_total():
    objective = compose(["objective=hybrid", "objective.schedule.stage2_at=0.4"]).objective
    assert objective.schedule.stage2_step is None   # the default gives fractions, not steps
    # centralized: 100 steps -> stage 2 at step 40, seg's warm-up (0.2) ends at 20
    central = resolve_schedule(objective, 100)
    assert (central.stage2_step, central.seg_start_step) == (40, 20)
    assert (central.hybridmed_stage(39), central.hybridmed_stage(40)) == (1, 2)
    assert central.start_step["token"] == central.start_step["caption"] == 40 and central.start_step["global"] == 0
    # a federation of 10 rounds x 25 local steps: one schedule over the sites' continued steps -> step 100
    fed = compose(["objective=hybrid", "federation.rounds=10", "federation.local_steps=25"])
    assert federation_steps(fed) == 250 and resolve_schedule(fed.objective, 250).stage2_step == 100
    assert [hybridmed_stage(fed, (r - 1) * 25) for r in (4, 5)] == [1, 2]   # the server's round config: round 5
    # the sites' model, built from the same config, switches at the same step
    model = create_model(compose([*FAST, "objective=hybrid", "federation.rounds=10", "federation.local_steps=25"]))
    assert (model.hybridmed_stage(99), model.hybridmed_stage(100)) == (1, 2) and model.schedule.seg_start_step == 50
    model.plan_schedule(100)   # the centralized run re-plans for its own total
    assert model.hybridmed_stage(40) == 2 and "token" in model.active_terms(40) and "seg" in model.active_terms(20)
    # every term trains in a run of any length: none is left out, however short
    assert all(terms_never_trained(objective, steps) == {} for steps in (2, 7, 350))
    assert all(schedule_notice(compose([f"objective={p}"]).objective, 3, "x") is None for p in ("hybridmed", "g2d"))


def test_an_absolute_schedule_reproduces_the_old_switch_step_and_wins_over_the_fraction():
    absolute = compose(["objective=hybrid", "objective.schedule.stage2_step=1000",
                        "objective.schedule.seg_start_step=200"]).objective
    schedule = resolve_schedule(absolute, 350)   # the fractions (0.4, 0.2) are still set: the steps win
    assert (schedule.stage2_step, schedule.seg_start_step, schedule.start_step["distill"]) == (1000, 200, 1000)
    assert terms_never_trained(absolute, 350) == {"global_impression": 1000, "token": 1000, "caption": 1000,
                                                  "distill": 1000}
    assert "never train" in schedule_notice(absolute, 350, "each site")
    # a term pinned to its own step; the papers' hybridmed schedule without fractions
    pinned = compose(["objective=hybrid", "+objective.schedule.start_step.tag=7"]).objective
    assert resolve_schedule(pinned, 100).start_step["tag"] == 7
    paper = compose(["objective=hybridmed", "objective.schedule.stage2_step=1000"]).objective
    assert resolve_schedule(paper).stage2_step == 1000   # no fraction left: no total needed


@pytest.mark.parametrize("overrides, message", [
    (["objective.schedule.stage2_at=1.5"], "in [0, 1]"),
    (["+objective.schedule.stage2_start=3"], "unknown keys ['stage2_start']"),
    (["+objective.schedule.start_step.nonsense=3"], "does not weight"),
])
def test_a_bad_schedule_is_refused_with_the_key_to_fix(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_schedule(compose(["objective=hybrid", *overrides]).objective, 100)
    with pytest.raises(ValueError, match="no total was given"):
        resolve_schedule(compose(["objective=hybrid"]).objective)


@pytest.mark.parametrize("old, new", [("warmup_steps", "seg_start_step"), ("warmup_at", "seg_start_at")])
def test_the_seg_start_old_keys_are_refused_with_the_new_name(old, new):
    with pytest.raises(RenamedKeyError, match=f"use objective.schedule.{new}"):
        compose(["objective=hybrid", f"+objective.schedule.{old}=0.3"])
    objective = OmegaConf.to_container(compose(["objective=hybrid"]).objective)
    objective["schedule"][old] = 0.3   # a hand-written config file that kept the old name
    with pytest.raises(ValueError, match=f"objective.schedule.{old} is now objective.schedule.{new}"):
        resolve_schedule(objective, 100)


def _gradient_owners(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_stage2_gradients_reach_all_but_the_summary_teacher(hybrid, batch):
    got = _gradient_owners(hybrid, hybrid(batch, step=10)["loss"])
    decoder = hybrid.objectives["impression"].decoder
    teacher = {f"objectives.impression.decoder.{n}" for n, _ in decoder.named_branch_parameters("summary")}
    trainable = {n for n, p in hybrid.named_parameters() if p.requires_grad}
    assert teacher and not (got & teacher)
    assert got == trainable - teacher


def test_stage1_trains_only_the_summary_path(batch):
    model = create_model(compose([*FAST, "objective=hybridmed", "objective.schedule.stage2_step=10"]))
    out = model(batch, step=0)
    assert set(out) == {"summary", "loss"}
    got = _gradient_owners(model, out["loss"])
    assert not any(n.startswith(("image_encoder.", "image_projection", "image_token_projection")) for n in got)
    assert not any(".caption." in n for n in got)
    assert any(".summary." in n for n in got) and any(n.startswith("text_encoder.") for n in got)


def test_missing_sections_fall_back(hybrid):
    samples = [make_sample(i, findings=False, impression=False) for i in range(3)]
    for s in samples:  # free text only
        s.update(report="The lungs are clear. No pneumothorax.", sentences=[], sentence_sections=[], sentence_regions=[])
    out = hybrid(collate(samples, hybrid.tokenizer, 48), step=10)
    torch.testing.assert_close(out["global_impression"], out["global"])  # impression falls back to the report
    for term in ("token", "summary", "caption", "distill", "region"):
        assert out[term].item() == 0.0 and out[term].requires_grad, term
    assert torch.isfinite(out["loss"])


def test_token_alignment_on_cnn_uses_attention_pool(batch):
    cnn = [o for o in FAST if "depth" not in o]
    model = create_model(compose([*cnn, "~model.image.kwargs.depth", "model.image.timm_name=resnet18",
                                  "objective=hybridmed", "objective.schedule.stage2_step=0"]))
    seen = {}
    model.objectives["token"].register_forward_pre_hook(lambda m, args: seen.update(weights=args[1]))
    out = model(batch, step=0)
    expected = model.image_encoder(batch["images"]).patch_weights
    torch.testing.assert_close(seen["weights"], expected)
    assert seen["weights"].shape == (4, 4)  # 64 px ResNet: 2 x 2 grid
    got = _gradient_owners(model, out["token"])
    assert any(n.startswith("image_encoder.model.layer4") for n in got)


def test_tag_queries_are_cached_not_recomputed(batch):
    model = create_model(compose([*FAST, "objective=asg"]))
    tag = model.objectives["tag"]
    calls = []
    model.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        optimizer.zero_grad()
        model(batch, step=step)["loss"].backward()
        optimizer.step()
        if step == 0:
            queries = tag.tag_queries.clone()
    assert int(tag.query_updates) == 1
    assert calls.count(len(OBSERVATIONS)) == 1  # the tag names went through the text encoder once
    torch.testing.assert_close(tag.tag_queries, queries)
    model.refresh_tag_queries()  # e.g. once per round: the trained text encoder gives new queries
    assert int(tag.query_updates) == 2 and not torch.allclose(tag.tag_queries, queries)


def test_encode_image_and_text_are_normalised(hybrid, batch):
    hybrid.eval()
    images = hybrid.encode_image(batch["images"])
    texts = hybrid.encode_text(batch["report_ids"], batch["report_mask"])
    hybrid.train()
    assert images.shape == texts.shape == (4, 128)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(4))


# -- sharing --------------------------------------------------------------------------------------
def test_split_state_by_patterns(hybrid):
    cfg = hybrid_cfg()
    shared, local = split_state(hybrid, cfg)
    assert set(shared) | set(local) == set(hybrid.state_dict()) and not set(shared) & set(local)
    prefixes = ("image_encoder.", "text_encoder.", "image_projection.", "text_projection.",
                "image_token_projection.", "text_token_projection.")
    assert all(n.startswith(prefixes) for n in shared)
    assert all(n.startswith("objectives.") for n in local)
    assert "objectives.tag.tag_queries" in local
    narrowed = split_state(hybrid, hybrid_cfg("model.sharing.local=[text_encoder.*]"))[0]
    assert not any(n.startswith("text_encoder.") for n in narrowed)


def test_fedbn_keeps_norm_layers_local():
    model = ImageEncoder("resnet18", img_size=SIZE)
    names = shared_parameter_names(model, patterns=["*"], fedbn=True)
    assert "model.bn1.running_mean" not in names and "model.bn1.weight" not in names
    assert "model.conv1.weight" in names
    assert "model.bn1.running_mean" in shared_parameter_names(model, patterns=["*"])


def test_report_pooling_mean_is_the_masked_token_mean_and_cls_is_the_first_token():
    from shared_models.text_encoder import TextEncoder

    config = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "vocab_size": 50, "max_position_embeddings": 16}
    torch.manual_seed(0)
    ids = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]])
    mask = (ids != 0).long()
    mean_encoder = TextEncoder(config=config, pooling="mean").eval()
    cls_encoder = TextEncoder(config=config, pooling="cls").eval()
    cls_encoder.load_state_dict(mean_encoder.state_dict())
    with torch.no_grad():
        mean_out, cls_out = mean_encoder(ids, mask), cls_encoder(ids, mask)
    by_hand = torch.stack([mean_out.token_embeds[0, :4].mean(0), mean_out.token_embeds[1, :3].mean(0)])
    torch.testing.assert_close(mean_out.report_emb, by_hand)
    torch.testing.assert_close(cls_out.report_emb, cls_out.token_embeds[:, 0])
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(config=config, pooling="max")


# -- projection heads ---------------------------------------------------------------------------------

def test_mlp_bn_head_standardises_each_dimension_over_the_batch():
    from shared_models.projection import create_projection_head

    torch.manual_seed(0)
    head = create_projection_head("mlp_bn", 12, 6, hidden_dim=16).train()
    # Inputs that nearly coincide, as a random-init encoder's features do: the head still spreads them.
    features = torch.randn(1, 12) + 0.01 * torch.randn(32, 12)
    out = head(features)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=0, unbiased=False), torch.ones(6), atol=1e-2, rtol=0)
    def mean_pairwise_cosine(x):
        unit = nn.functional.normalize(x, dim=-1)
        return float((unit @ unit.T)[~torch.eye(len(x), dtype=torch.bool)].mean())
    assert mean_pairwise_cosine(features) > 0.99 and abs(mean_pairwise_cosine(out)) < 0.1
    linear = create_projection_head("linear", 12, 6, hidden_dim=16)
    assert isinstance(linear, torch.nn.Linear) and linear.out_features == 6
    with pytest.raises(ValueError, match="model.projection_head must be one of"):
        create_projection_head("mlp", 12, 6, hidden_dim=16)


def test_a_training_batch_of_one_is_refused_with_the_batch_norm_heads(hybrid):
    one = collate([make_sample(0)], hybrid.tokenizer, max_length=48)
    hybrid.train()
    with pytest.raises(ValueError, match="batch of 1 study.*projection_head=linear"):
        hybrid(one, step=0)
    hybrid.eval()
    with torch.no_grad():
        assert hybrid.encode_image(one["images"]).shape == (1, hybrid.projection_dim)  # eval: running statistics
    hybrid.train()
