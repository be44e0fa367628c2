"""Each objective on small hand-computed cases, plus the gradients each must (and must not) produce."""
import math

import pytest
import torch
import torch.nn.functional as F

from shared_models.objectives import (
    GlobalContrastive,
    ImpressionDecoder,
    ImpressionGeneration,
    PseudoSegmentation,
    RegionSentenceAlignment,
    SegmentationDecoder,
    SoftLabelContrastive,
    TagRecognition,
    TokenAlignment,
    clip_and_normalise_weights,
    dice_bce_loss,
    pseudo_masks,
    region_features,
    soft_targets,
)
from shared_models.objectives.impression import distillation_kl, token_cross_entropy
from shared_models.objectives.token import masked_quantiles

R2 = 1 / math.sqrt(2)


def cross_entropy(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def softmax(logits: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in logits)
    return [math.exp(v) / total for v in logits]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# --- global contrastive ------------------------------------------------------------------------------

def test_global_contrastive_matches_hand_computed_2x2():
    image = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised inside: e1, e2
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # e1, (e1 + e2) / sqrt 2
    # cosine: image0.text = [1, R2], image1.text = [0, R2]; temperature 0.5 doubles them
    rows = cross_entropy([2.0, 2 * R2], 0) + cross_entropy([0.0, 2 * R2], 1)
    cols = cross_entropy([2.0, 0.0], 0) + cross_entropy([2 * R2, 2 * R2], 1)
    expected = (rows / 2 + cols / 2) / 2
    assert GlobalContrastive(temperature=0.5)(image, text).item() == pytest.approx(expected, rel=1e-6)


def test_global_contrastive_is_symmetric_and_rejects_unpaired_batches():
    torch.manual_seed(0)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    loss = GlobalContrastive()
    assert loss(image, text).item() == pytest.approx(loss(text, image).item(), rel=1e-6)
    with pytest.raises(ValueError, match="paired"):
        loss(image, text[:4])


# --- soft-label contrastive --------------------------------------------------------------------------

def test_soft_label_matches_hand_computed_two_studies():
    tags = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, -1.0]])  # present vectors (1,0,1), (1,1,0): cosine 1/2
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # target rows: 0.8 I + 0.2 [[1, .5], [.5, 1]] = [[1, .1], [.1, 1]], L1-normalised
    target = [[1 / 1.1, 0.1 / 1.1], [0.1 / 1.1, 1 / 1.1]]
    i2t = [[1.0, R2], [0.0, R2]]  # temperature 1
    t2i = [[1.0, 0.0], [R2, R2]]

    def symmetric(rows):
        return sum((kl(t, softmax(r)) + kl(softmax(r), t)) / 2 for t, r in zip(target, rows)) / 2

    expected = (symmetric(i2t) + symmetric(t2i)) / 2
    loss = SoftLabelContrastive(temperature=1.0, alpha=0.8, eps=0.0)(image, text, tags)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_soft_targets_reduce_to_clip_targets_for_disjoint_tags_and_handle_untagged_studies():
    disjoint = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, 0.0, 0.0]])  # last study: no tag at all
    assert torch.allclose(soft_targets(disjoint, eps=0.0), torch.eye(3))

    identical = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    expected = (0.8 * torch.eye(3) + 0.2 * torch.ones(3, 3)) / 1.4  # each row sums to 0.8 + 3 * 0.2
    assert torch.allclose(soft_targets(identical, eps=0.0), expected)


def test_soft_label_loss_is_lower_when_similarities_follow_the_tags():
    tags = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    image = torch.eye(3)
    loss = SoftLabelContrastive()
    shared_tags_close = torch.tensor([[1.0, 0.3, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 1.0]])
    shared_tags_far = torch.tensor([[1.0, 0.0, 0.3], [0.0, 1.0, 0.3], [0.3, 0.0, 1.0]])
    assert loss(image, shared_tags_close, tags) < loss(image, shared_tags_far, tags)


# --- token-level alignment ---------------------------------------------------------------------------

def test_clip_and_normalise_weights_clips_at_each_rows_quantiles_and_ignores_padding():
    weights = torch.tensor([[*range(11), 100.0, 100.0]])  # two padded entries with huge values
    mask = torch.tensor([[True] * 11 + [False, False]])
    # 10 % / 90 % quantiles of 0..10 are 1 and 9
    clipped = torch.tensor([[1.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 0, 0]])
    assert torch.allclose(clip_and_normalise_weights(weights, mask), clipped / clipped.sum())


def _token_case(temperature: float):
    """One sample: patches e1, e2 and words e1, e2; the loss in closed form."""
    sigma = math.exp(1 / temperature) / (math.exp(1 / temperature) + 1)  # attention of a word on its own patch
    norm = math.hypot(sigma, 1 - sigma)
    own, other = sigma / norm, (1 - sigma) / norm  # cosine of a token with its own / the other attended feature
    per_direction = math.log(1 + math.exp((other - own) / temperature))
    return 2 * per_direction  # word loss + patch loss, each the same by symmetry


def test_token_alignment_matches_closed_form_and_masks_padding():
    temperature = 0.5
    patches = torch.eye(2)[None]
    words = torch.cat([torch.eye(2), torch.tensor([[0.3, -0.9]])])[None]  # third word is padding
    mask = torch.tensor([[True, True, False]])
    loss = TokenAlignment(temperature)(patches, torch.ones(1, 2), words, mask, torch.ones(1, 3))
    assert loss.item() == pytest.approx(_token_case(temperature), rel=1e-5)

    # A sample without any word contributes nothing (rather than contrasting padding).
    batch_patches = torch.cat([patches, torch.randn(1, 2, 2)])
    batch_words = torch.cat([words, torch.randn(1, 3, 2)])
    batch_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    batch_loss = TokenAlignment(temperature)(batch_patches, torch.ones(2, 2), batch_words, batch_mask, torch.ones(2, 3))
    assert batch_loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_token_alignment_clips_weights_inside_and_reaches_patch_and_word_tokens():
    torch.manual_seed(0)
    patches = torch.randn(2, 6, 8, requires_grad=True)
    words = torch.randn(2, 11, 8, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    raw = torch.arange(11.0).repeat(2, 1)
    hand_clipped = raw.clamp(1, 9)  # row 0's own quantiles; row 1 (7 words) is clipped inside the loss too
    loss = TokenAlignment()
    a = loss(patches, torch.ones(2, 6), words, mask, raw)
    # Same loss as with weights already clipped for row 0 => the raw weights were clipped inside.
    b = loss(patches, torch.ones(2, 6), words, mask, torch.where(torch.arange(2)[:, None] == 0, hand_clipped, raw))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert a.item() != pytest.approx(loss(patches, torch.ones(2, 6), words, mask, raw ** 3).item(), rel=1e-4)

    a.backward()
    assert patches.grad.abs().sum() > 0
    assert words.grad[mask].abs().sum() > 0
    assert torch.all(words.grad[~mask] == 0)  # padded words take no part


# --- impression generation ---------------------------------------------------------------------------

def _decoder_batch():
    torch.manual_seed(0)
    decoder = ImpressionDecoder(vocab_size=13, dim=16, num_layers=2, num_heads=2, max_len=8, pad_id=0)
    ids = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
    mask = ids != 0
    patches = torch.randn(2, 4, 16, requires_grad=True)
    findings = torch.randn(2, 5, 16, requires_grad=True)
    findings_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    return decoder, ids, mask, patches, findings, findings_mask


def test_token_cross_entropy_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[2, 4, 0]])
    mask = torch.tensor([[True, True, False]])
    expected = (cross_entropy(logits[0, 0].tolist(), 2) + cross_entropy(logits[0, 1].tolist(), 4)) / 2
    assert token_cross_entropy(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)
    logits[0, 2] += 100.0
    assert token_cross_entropy(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_is_kl_teacher_to_student_scaled_by_temperature_squared():
    teacher = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax [1/4, 3/4]
    student = torch.zeros(1, 1, 2)  # softmax [1/2, 1/2]
    mask = torch.ones(1, 1, dtype=torch.bool)
    expected = kl([0.25, 0.75], [0.5, 0.5])
    assert distillation_kl(student, teacher, mask, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_kl(student, 2 * teacher, mask, 2.0).item() == pytest.approx(4 * expected, rel=1e-6)


def test_stage_one_trains_summarisation_only():
    decoder, ids, mask, patches, findings, findings_mask = _decoder_batch()
    terms = ImpressionGeneration(decoder)(ids, mask, patches, findings, findings_mask, stage=1)
    assert set(terms) == {"summary"}
    terms["summary"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.branch_parameters("summary"))
    assert all(p.grad is None for p in decoder.branch_parameters("caption"))


def test_stage_two_freezes_the_summarisation_teacher():
    decoder, ids, mask, patches, findings, findings_mask = _decoder_batch()
    terms = ImpressionGeneration(decoder, distill_temperature=2.0)(ids, mask, patches, findings, findings_mask, stage=2)
    assert set(terms) == {"summary", "caption", "distill"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())

    # The teacher's logits are targets: distillation sends nothing back to the findings.
    (distill_grad,) = torch.autograd.grad(terms["distill"], findings, retain_graph=True, allow_unused=True)
    assert distill_grad is None or torch.all(distill_grad == 0)

    sum(terms.values()).backward()
    summary_params = list(decoder.named_branch_parameters("summary"))
    assert summary_params and all(p.grad is None for _, p in summary_params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.branch_parameters("caption"))
    for layer in decoder.layers:
        for module in (layer.self_attention, layer.mlp):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert patches.grad.abs().sum() > 0 and findings.grad.abs().sum() > 0


@pytest.mark.parametrize("train", [False, True])
def test_a_frozen_branch_computes_the_same_logits_and_leaves_the_model_untouched(train):
    """Freezing the summary branch reads its weights as constants: the logits are the unfrozen pass's, the
    gradient reaches the memory and the shared weights but not the branch's own, and the module is never
    written to during the pass (the DP loop runs studies on several threads over one model)."""
    decoder, ids, mask, patches, findings, findings_mask = _decoder_batch()
    decoder.train(train)   # dropout 0: train mode takes MultiheadAttention's slow path, eval its fast one
    owned = dict(decoder.named_branch_parameters("summary"))
    seen_during_pass = []

    def check_owned(module, args):
        now = dict(decoder.named_branch_parameters("summary"))
        seen_during_pass.append(now.keys() == owned.keys() and all(now[n] is owned[n] for n in owned))

    hooks = [layer.register_forward_pre_hook(check_owned) for layer in decoder.layers]
    frozen = decoder(ids, mask, findings, findings_mask, "summary", frozen=True)
    for hook in hooks:
        hook.remove()
    assert seen_during_pass == [True] * len(decoder.layers)
    plain = decoder(ids, mask, findings, findings_mask, "summary")
    assert torch.allclose(frozen, plain, atol=1e-6)

    (frozen * torch.randn_like(frozen)).sum().backward()
    assert all(p.grad is None for p in owned.values())
    assert findings.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.layers[0].self_attention.parameters())
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in owned.values())


def test_decoder_is_causal_and_rejects_left_padding():
    decoder, ids, mask, patches, findings, findings_mask = _decoder_batch()
    decoder.eval()
    logits = decoder(ids, mask, findings, findings_mask, "summary")
    changed = ids.clone()
    changed[:, 3] = 11
    later = decoder(changed, mask, findings, findings_mask, "summary")
    assert torch.allclose(logits[:, :3], later[:, :3], atol=1e-6)
    assert not torch.allclose(logits[:, 3:], later[:, 3:])
    with pytest.raises(ValueError, match="right-padded"):
        decoder(ids.flip(1), mask.flip(1), findings, findings_mask, "summary")


# --- region-sentence alignment -----------------------------------------------------------------------

def test_region_features_pool_each_images_own_box():
    columns = torch.arange(4.0).expand(4, 4)  # value = column index
    grid = torch.stack([columns, 10 + columns])[:, None]  # [2, 1, 4, 4], image 1 offset by 10
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]] * 2)  # left half, right half
    features = region_features(grid, boxes)[..., 0]
    assert torch.allclose(features, torch.tensor([[0.5, 2.5], [10.5, 12.5]]))


def test_region_features_are_torchvisions_roi_align_without_it():
    from torchvision.ops import roi_align

    generator = torch.Generator().manual_seed(0)
    for height, width in [(4, 4), (3, 7), (8, 5), (2, 2)]:
        grid = torch.randn(3, 5, height, width, generator=generator)
        corners = torch.rand(3, 6, 2, 2, generator=generator)
        low, high = corners.min(dim=2).values, (corners.max(dim=2).values + 0.01).clamp(max=1.0)
        boxes = torch.cat([low, high], dim=-1)                    # x1, y1, x2, y2
        boxes[0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])          # the whole image
        boxes[1, 1] = torch.tensor([0.3, 0.2, 0.31, 0.21])        # under one cell
        boxes[2, 2] = torch.tensor([2.0, 0.0, 3.0, 1.0])          # wholly off the image: pools nothing
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        rois = torch.cat([torch.arange(3.0).repeat_interleave(6)[:, None], (boxes * scale).reshape(-1, 4)], dim=1)
        expected = roi_align(grid, rois, output_size=1, spatial_scale=1.0, aligned=True).reshape(3, 6, 5)
        torch.testing.assert_close(region_features(grid, boxes), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(region_features(grid, boxes)[2, 2], torch.zeros(5))


def test_masked_quantile_interpolates_as_nanquantile_over_each_rows_valid_entries():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(6, 9, generator=generator)
    mask = torch.rand(6, 9, generator=generator) < 0.6
    mask[:, 0], mask[5] = True, False
    mask[5, 3] = True  # one valid entry: every quantile is that entry
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        expected = torch.nanquantile(values.masked_fill(~mask, float("nan")), q, dim=1, keepdim=True)
        torch.testing.assert_close(masked_quantiles(values, mask, (q,))[0], expected)
    assert masked_quantiles(torch.tensor([[4.0, 1.0, 3.0, 9.0]]), torch.tensor([[True, True, True, False]]), (0.25,))[0] == 2.0  # 1, 3, 4: halfway 1..3


def test_region_sentence_matches_hand_computed_case_and_leaves_out_unnamed_sentences():
    grid = torch.zeros(1, 2, 2, 2)
    grid[0, 0, :, 0] = 1.0  # left column: feature e1
    grid[0, 1, :, 1] = 1.0  # right column: feature e2
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]])
    sentences = torch.tensor([[[1.0, 0.0], [0.2, 0.7]]])
    regions = torch.tensor([[0, -1]])  # second sentence names no region
    loss = RegionSentenceAlignment(temperature=1.0)(grid, boxes, sentences, regions)
    # sentence -> region: logits [1, 0], target 0; region 0 -> sentence: its only usable sentence, loss 0
    assert loss.item() == pytest.approx((cross_entropy([1.0, 0.0], 0) + 0.0) / 2, rel=1e-5)
    other = RegionSentenceAlignment(temperature=1.0)(grid, boxes, torch.tensor([[[1.0, 0.0], [-5.0, 3.0]]]), regions)
    assert other.item() == pytest.approx(loss.item(), rel=1e-6)


def _region_batch():
    torch.manual_seed(0)
    batch, regions, sentences = 4, 3, 5
    grid = torch.randn(batch, 8, 6, 6)
    corner = torch.rand(batch, regions, 2) * 0.5
    boxes = torch.cat([corner, corner + 0.2 + torch.rand(batch, regions, 2) * 0.3], dim=-1)  # differ per image
    sentence_emb = torch.randn(batch, sentences, 8)
    sentence_regions = torch.randint(-1, regions, (batch, sentences))
    return grid, boxes, sentence_emb, sentence_regions


def test_region_sentence_uses_each_images_own_regions_after_shuffling():
    grid, boxes, sentence_emb, sentence_regions = _region_batch()
    loss = RegionSentenceAlignment()
    reference = loss(grid, boxes, sentence_emb, sentence_regions)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = loss(grid[order], boxes[order], sentence_emb[order], sentence_regions[order])
    assert shuffled.item() == pytest.approx(reference.item(), rel=1e-5)
    # ASG's bug: boxes (with their batch indices) left in the old order while the batch is re-ordered.
    stale = loss(grid[order], boxes, sentence_emb[order], sentence_regions[order])
    assert stale.item() != pytest.approx(reference.item(), rel=1e-3)


def test_region_sentence_without_usable_sentences_is_zero_with_gradient():
    grid, boxes, sentence_emb, _ = _region_batch()
    grid.requires_grad_(True)
    boxes[:, 1] = float("nan")  # a missing box: sentences naming it are left out too
    regions = torch.full(sentence_emb.shape[:2], -1)
    regions[0, 0] = 1
    loss = RegionSentenceAlignment()(grid, boxes, sentence_emb, regions)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(torch.isfinite(grid.grad)) and torch.all(grid.grad == 0)
    with pytest.raises(ValueError, match="names region 7"):
        RegionSentenceAlignment()(grid, boxes, sentence_emb, torch.full(sentence_emb.shape[:2], 7))


# --- image-tag recognition ---------------------------------------------------------------------------

def test_tag_queries_are_a_buffer_set_once_and_never_trained():
    torch.manual_seed(0)
    model = TagRecognition(dim=16, num_tags=3, num_layers=1, num_heads=2).eval()
    tags = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    patches = torch.randn(2, 4, 16)
    with pytest.raises(RuntimeError, match="set_tag_queries"):
        model(patches, tags)
    queries = torch.randn(3, 16, requires_grad=True)
    model.set_tag_queries(queries)
    for _ in range(3):
        loss, logits = model(patches, tags)
        loss.backward()
    assert int(model.query_updates) == 1
    assert "tag_queries" in model.state_dict() and "tag_queries" not in dict(model.named_parameters())
    assert not model.tag_queries.requires_grad and queries.grad is None
    assert logits.shape == (2, 3)


@pytest.mark.parametrize(
    "uncertain, target, counted", [("ignore", 0.0, False), ("positive", 1.0, True), ("negative", 0.0, True)]
)
def test_tag_recognition_bce_follows_the_uncertain_policy(uncertain, target, counted):
    torch.manual_seed(0)
    model = TagRecognition(dim=16, num_tags=3, num_layers=1, num_heads=2, uncertain=uncertain).eval()
    model.set_tag_queries(torch.randn(3, 16))
    tags = torch.tensor([[1.0, 0.0, -1.0]])
    loss, logits = model(torch.randn(1, 4, 16), tags)
    sigmoid = [1 / (1 + math.exp(-v)) for v in logits[0].tolist()]
    terms = [-math.log(sigmoid[0]), -math.log(1 - sigmoid[1])]  # tags 1 and 0
    if counted:
        p = sigmoid[2]
        terms.append(-math.log(p if target == 1.0 else 1 - p))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


# --- pseudo segmentation -----------------------------------------------------------------------------

def test_pseudo_masks_hold_each_images_own_top_15_percent():
    torch.manual_seed(0)
    attention = torch.rand(2, 3, 16).softmax(-1)
    attention[1] *= 100  # a global threshold would give image 0 nothing and image 1 everything
    attention.requires_grad_(True)
    masks = pseudo_masks(attention, (4, 4), (20, 20))
    assert masks.shape == (2, 1, 20, 20) and not masks.requires_grad
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    upsampled = F.interpolate(attention.detach().mean(1).view(2, 1, 4, 4), size=(20, 20), mode="bilinear")
    for image in range(2):
        assert int(masks[image].sum()) == 60  # 15 % of 400 pixels
        inside, values = masks[image].flatten().bool(), upsampled[image].flatten()
        assert values[inside].min() >= values[~inside].max()  # the 60 kept are the highest


def test_dice_is_taken_on_probabilities():
    logits = torch.tensor([[[[0.0, math.log(3.0)], [-math.log(3.0), 0.0]]]])  # sigmoid .5 .75 / .25 .5
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    dice = 1 - 2 * (0.5 + 0.75) / ((0.5 + 0.75 + 0.25 + 0.5) + 2)
    bce = (2 * math.log(2) + 2 * math.log(4 / 3)) / 4
    assert dice_bce_loss(logits, target).item() == pytest.approx(dice + 0.2 * bce, rel=1e-5)


def test_segmentation_decoder_takes_the_pyramid_finest_first():
    pyramid = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    decoder = SegmentationDecoder([8, 16, 32], out_size=(32, 32), width=32)
    assert decoder(pyramid).shape == (2, 1, 32, 32)
    with pytest.raises(RuntimeError):
        decoder(pyramid[::-1])  # coarsest first does not fit the channels


def test_pseudo_segmentation_trains_the_decoder_not_the_attention():
    torch.manual_seed(0)
    pyramid = [torch.randn(2, 8, 16, 16, requires_grad=True), torch.randn(2, 16, 8, 8, requires_grad=True)]
    attention = torch.rand(2, 64, requires_grad=True)
    objective = PseudoSegmentation([8, 16], width=16)
    loss = objective(pyramid, attention, (8, 8), (32, 32))
    loss.backward()
    assert attention.grad is None
    assert all(p.grad is not None for p in objective.parameters())
    assert pyramid[0].grad.abs().sum() > 0


# --- the registry: an objective is one module --------------------------------------------------------
class PairModel(torch.nn.Module):
    """Two linear towers and one registered contrastive term, as DP-SGD's clipping sees a model."""

    def __init__(self, term: str):
        super().__init__()
        self.lambdas = {term: 1.0}
        self.image, self.text = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
        self.pair = GlobalContrastive(0.5)

    def active_terms(self, step: int) -> list[str]:
        return list(self.lambdas)

    def forward(self, batch: dict, step: int = 0) -> dict:
        out = {term: self.pair(self.image(batch["x"]), self.text(batch["y"])) for term in self.lambdas}
        return {**out, "loss": sum(self.lambdas[t] * out[t] for t in out)}


@pytest.fixture
def toy_objective():
    """A toy coupled objective registered the way an objective module registers itself; removed afterwards."""
    from shared_models.objectives.registry import register_objective, unregister_objective

    @register_objective("toy_pair", build=lambda c, m: GlobalContrastive(c["temperature"]),
                        inputs=("image_emb", "report_emb"), coupled=True, starts={"toy_pair": "seg_start"})
    def toy_pair_loss(model, s, step):
        return {"toy_pair": model.objectives["toy_pair"](s.image_emb, s.report_emb)}

    yield "toy_pair"
    unregister_objective("toy_pair")


def test_every_objective_module_registers_its_terms_config_section_and_coupling():
    from shared_models.objectives.registry import coupled_terms, objective_of_term, objectives

    assert {name: o.terms for name, o in objectives().items()} == {
        "global": ("global",), "global_impression": ("global_impression",), "token": ("token",),
        "impression": ("summary", "caption", "distill"), "region": ("region",), "tag": ("tag",),
        "soft_label": ("soft_label",), "seg": ("seg",)}
    assert coupled_terms() == {"global", "global_impression", "soft_label"}
    # a coupled term reads only rows that the per-patient loop stacks (StackedInputs)
    assert all(set(o.inputs) <= {"image_emb", "report_emb", "impression_emb"} for o in objectives().values()
               if o.coupled)
    assert objective_of_term()["caption"].name == "impression" and objective_of_term()["seg"].starts == {"seg": "seg_start"}
    # each module is named after its config section, except `global` (a Python keyword)
    modules = {o.name: o.loss.__module__.rsplit(".", 1)[1] for o in objectives().values()}
    assert {n for n, m in modules.items() if n != m} == {"global", "global_impression"}


def test_a_registered_coupled_term_changes_dp_clipping_without_editing_it(toy_objective):
    from client.privacy.clipped_sum import clipped_gradient_sum
    from client.privacy.clipping import ClipNorms, split_terms
    from shared_models.objectives.registry import unregister_objective

    assert split_terms({toy_objective, "tag"}, 4) == ({toy_objective}, {"tag"})
    assert split_terms({toy_objective, "tag"}, 1) == (set(), {"tag"})   # one study: no negatives, none coupled
    g = torch.Generator().manual_seed(0)
    samples = [{"x": torch.randn(6, generator=g), "y": torch.randn(5, generator=g)} for _ in range(5)]
    collate_fn = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    torch.manual_seed(0)
    model, never_binds = PairModel(toy_objective), ClipNorms(1e9, 1e9)
    params = list(model.parameters())
    # coupled: taken on the whole batch, so unclipped S(B)/n is the batch gradient
    coupled = clipped_gradient_sum(model, samples, collate_fn, 0, never_binds, coupled_scale=5, per_study="loop")
    expected = torch.autograd.grad(model(collate_fn(samples))["loss"], params)
    torch.testing.assert_close(torch.cat([g.flatten() for g in coupled.gradient]) / 5,
                               torch.cat([g.flatten() for g in expected]), atol=1e-5, rtol=1e-4)
    assert float(torch.cat([g.flatten() for g in coupled.gradient]).norm()) > 1e-3
    # not registered any more: a per-patient term on one-study batches, whose contrastive gradient is 0
    unregister_objective(toy_objective)
    assert split_terms({toy_objective}, 4) == (set(), {toy_objective})
    alone = clipped_gradient_sum(model, samples, collate_fn, 0, never_binds, coupled_scale=5, per_study="loop")
    assert float(torch.cat([g.flatten() for g in alone.gradient]).norm()) < 1e-6


def test_a_registered_objective_is_built_weighted_and_scheduled_by_the_model(toy_objective):
    from benchmarks.common import synthetic_samples
    from shared_models.batch import collate
    from shared_models.config import compose
    from shared_models.factory import create_model

    torch.manual_seed(0)
    cfg = compose(["model.image.img_size=64", "model.image.kwargs.depth=2", "model.text.max_length=48",
                   "model.text.tokenizer.num_reports=300", "objective=clip", "+objective.lambdas.toy_pair=0.5",
                   "+objective.toy_pair={temperature: 0.1}", "objective.schedule.seg_start_step=null",
                   "+objective.schedule.seg_start_at=0.5"])
    model = create_model(cfg, total_steps=10)
    assert isinstance(model.objectives["toy_pair"], GlobalContrastive) and model.objectives["toy_pair"].temperature == 0.1
    assert model.active_terms(4) == ["global"] and model.active_terms(5) == ["global", "toy_pair"]
    assert model.coupled_rows([toy_objective]) == ["image_emb", "report_emb"]
    batch = collate(synthetic_samples(4, 64), model.tokenizer, max_length=48)
    out = model(batch, step=5)
    torch.testing.assert_close(out["loss"], out["global"] + 0.5 * out["toy_pair"])
