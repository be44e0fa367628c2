"""Benchmark plumbing: FLOP counting on a hand-computed model, op classification, `all` output and its tables."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import memory, run
from benchmarks.hardware import count_flops, matmul_flops_per_s, objectives_seconds, op_kind
from benchmarks.report import render_markdown

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class TwoTower(nn.Module):
    """The components the hardware section names, as single linear layers whose FLOPs are easy to count."""

    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Linear(8, 4)
        self.text_encoder = nn.Linear(6, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, batch: dict, step: int) -> dict:
        joint = self.image_encoder(batch["images"]) * self.text_encoder(batch["text"])
        return {"loss": self.head(joint).pow(2).mean()}


def test_flops_are_counted_per_component_and_for_backward():
    batch = {"images": torch.randn(16, 8), "text": torch.randn(16, 6)}
    forward, backward, components = count_flops(TwoTower(), batch, step=0)
    # A linear layer is 2 * batch * in * out FLOPs forward; backward needs the weight gradient of every
    # layer (same count) and the input gradient of the layers whose input requires grad (the head's only).
    assert components == {"image_encoder": 2 * 16 * 8 * 4, "text_encoder": 2 * 16 * 6 * 4, "objectives": 2 * 16 * 4 * 1}
    assert forward == sum(components.values())
    assert backward == forward + 2 * 16 * 4 * 1


def test_matmul_rate_is_a_plausible_flop_rate():
    rate = matmul_flops_per_s(torch.device("cpu"), size=256)
    assert 1e7 < rate < 1e14


@pytest.mark.parametrize("name, kind", [
    ("aten::mm", "matmul_conv"), ("aten::convolution_backward", "matmul_conv"), ("aten::addmm", "matmul_conv"),
    ("aten::native_batch_norm_backward", "normalization"), ("aten::native_layer_norm", "normalization"),
    ("aten::copy_", "data_movement"), ("aten::cat", "data_movement"),
    ("aten::gelu", "elementwise_other"), ("aten::sum", "elementwise_other"),
])
def test_profiler_ops_are_classified(name, kind):
    assert op_kind(name) == kind


def test_all_writes_machine_sections_and_markdown_tables(tmp_path, monkeypatch):
    hardware = {"train_flops_per_s": 2.0e9, "matmul_flops_per_s": 8.0e9, "ratio": 0.25, "step_flops": 4.0e10,
                "step_s": 20.0, "phases_s": {"forward": 5.0, "backward": 12.0, "optimizer": 3.0}}
    data = {"cache_images_per_s": 40.0, "train_images_per_s": 2.0, "ratio": 20.0, "dicom_decode_images_per_s": 3.5}
    monkeypatch.setattr(run, "SECTIONS", {"hardware": lambda args: hardware, "data": lambda args: data,
                                          "privacy": lambda args: {"tiny": {"dp_step_s": 3.0, "step_s": 1.0, "ratio": 3.0,
                                                                            "ratio_range": [2.5, 3.5], "cpu_ratio": 2.9,
                                                                            "batch_size": 8}, "method": "m"},
                                          "extra": lambda args: {"tiny": {"ratio": 3.0}}})
    out = tmp_path / "results" / "latest.json"
    assert run.main(["all", "--json", str(out), "--quick"]) == 0

    results = json.loads(out.read_text())
    assert list(results) == ["machine", "hardware", "data", "privacy", "extra"]
    assert {"cpu_count", "torch", "device", "section_seconds"} <= set(results["machine"])
    assert results["hardware"] == hardware and results["data"] == data
    markdown = out.with_suffix(".md").read_text()
    assert "```json" not in markdown
    assert "| 2 G | 8 G | 0.25 | 40 G | 20 |" in markdown        # FLOP-sized numbers in G
    assert "| backward | 12 | 0.6 |" in markdown                     # phase share of the step
    assert "| 40 | 2 | 20 |" in markdown                             # cache vs train images/s
    assert "| tiny | 3 | 1 | 3 | 2.5-3.5 | 2.9 | 8 |" in markdown   # DP step vs non-DP step, its spread
    assert "| tiny.ratio | 3 |" in markdown                          # a section without its own renderer: flat table


def test_single_section_writes_only_its_object(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "SECTIONS", {"memory": lambda args: {"tiny": {"peak_rss_mb": 512.0}}})
    out = tmp_path / "memory.json"
    assert run.main(["memory", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == {"tiny": {"peak_rss_mb": 512.0}}
    assert not out.with_suffix(".md").exists()


def test_markdown_of_objectives_is_a_preset_table():
    body = {"tiny": {"clip": {"step_s": 0.5, "ratio_vs_clip": 1.0}, "g2d": {"step_s": 1.0, "ratio_vs_clip": 2.0},
                     "batch_size": 8, "image_size": 128},
            "params": {"tiny": {"image_encoder": 5_000_000, "shared": 6_000_000}}}
    markdown = render_markdown({"objectives": body})
    assert "| g2d | 1 | 2 |" in markdown
    assert "| image_encoder | 5000000 |" in markdown


def test_peak_rss_is_the_child_own_not_its_parent():
    # This test process holds torch (hundreds of MB); a fresh child must not report that as its peak,
    # and must see its own 100 MB allocation.
    parent_mb = memory.peak_rss_mb()
    code = ("from benchmarks.memory import peak_rss_mb; before = peak_rss_mb(); block = b'x' * (100 << 20); "
            "print(before, peak_rss_mb())")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    before, after = map(float, done.stdout.split())
    assert parent_mb > 200 and before < parent_mb / 2
    assert 100 <= after - before < 110


def test_privacy_ratio_is_the_median_of_ratios_within_each_repeat(monkeypatch):
    """The non-DP and DP steps are timed in turn each repeat; a machine that slows down mid-run (repeat 2 here
    is twice as slow for every step) leaves the within-repeat ratios, and so the figure, unchanged."""
    from benchmarks import common, privacy

    # per repeat: plain, vmap, loop (wall, cpu); the first repeat is the warm-up and is dropped
    script = iter([(9, 9), (9, 9), (9, 9),
                   (1.0, 1.0), (2.0, 1.8), (3.0, 3.0),
                   (2.0, 2.0), (4.0, 3.6), (6.0, 6.0),
                   (1.0, 1.0), (2.5, 2.0), (3.5, 3.0)])
    monkeypatch.setattr(common, "timed", lambda fn: next(script))
    out = privacy.step_ratios(nn.Linear(2, 2), [], lambda samples: samples, step=0, repeats=3)
    assert out["vmap_ratio"] == 2.0 and out["vmap_ratio_range"] == [2.0, 2.5]
    assert out["vmap_cpu_ratio"] == 1.8
    assert out["loop_ratio"] == 3.0 and out["loop_ratio_range"] == [3.0, 3.5]
    assert out["step_s"] == 1.0 and out["vmap_step_s"] == 2.5


def test_interleaved_timing_takes_every_step_in_turn_and_drops_the_warm_up(monkeypatch):
    """The objectives and privacy sections rest on this: within each repeat every step runs once, in order, so a
    slowdown lands on all of them; ratio_to takes the ratio within a repeat, not of the medians."""
    from benchmarks import common

    calls = []
    clock = iter([(5, 5), (5, 5), (1.0, 1.0), (3.0, 3.0), (4.0, 4.0), (4.0, 4.0), (1.0, 1.0), (2.0, 2.0)])
    monkeypatch.setattr(common, "timed", lambda fn: (fn(), next(clock))[1])
    steps = {"clip": lambda: calls.append("clip"), "hybrid": lambda: calls.append("hybrid")}
    times = common.interleaved(steps, repeats=3, warmup=1)
    assert calls == ["clip", "hybrid"] * 4
    assert times == {"clip": [(1.0, 1.0), (4.0, 4.0), (1.0, 1.0)], "hybrid": [(3.0, 3.0), (4.0, 4.0), (2.0, 2.0)]}
    # within-repeat ratios 3, 1, 2 -> median 2; the medians' ratio (3 / 1) would say 3
    assert common.ratio_to(times, "hybrid", "clip") == {"ratio": 2.0, "cpu_ratio": 2.0, "ratio_range": [1.0, 3.0]}
    assert common.median_seconds(times["hybrid"]) == (3.0, 3.0)


def test_objectives_time_is_the_forward_the_encoders_leave_over_within_each_repeat():
    # The image encoder was slow in the first repeat, the text encoder in the second (a shared machine).
    forward = [1.3, 1.7, 1.1]
    components = [{"image_encoder": 0.6, "text_encoder": 0.6}, {"image_encoder": 0.3, "text_encoder": 1.2},
                  {"image_encoder": 0.35, "text_encoder": 0.65}]
    # Within each repeat the objectives take 0.1, 0.2, 0.1 s: median 0.1.
    assert objectives_seconds(forward, components) == pytest.approx(0.1)
    # Subtracting separate medians (1.3 - 0.35 - 0.65) would triple it.
    separate = statistics.median(forward) - sum(
        statistics.median(c[name] for c in components) for name in ("image_encoder", "text_encoder"))
    assert separate == pytest.approx(0.3)
    with pytest.raises(ValueError):
        objectives_seconds([1.0], [])


def test_hardware_report_shows_each_measured_model():
    from benchmarks.report import RENDERERS

    def body(model: str, ratio: float) -> dict:
        return {"model": model, "objective": "hybrid", "batch_size": 8, "image_size": 128, "device": "cpu",
                "matmul_size": 2048, "train_flops_per_s": 1.0e9, "matmul_flops_per_s": 4.0e9, "ratio": ratio}

    half = {**body("tiny_cnn_half", 0.47), "overrides": ["+recipe=cpu_quick"]}
    lines = "\n".join(RENDERERS["hardware"]({**body("resnet50_bert", 0.71),
                                             "models": {"tiny_cnn_half": half, "tiny_cnn": body("tiny_cnn", 0.25)}}))
    assert "`resnet50_bert` / `hybrid` training" in lines and "`tiny_cnn` / `hybrid` training" in lines
    assert "`tiny_cnn_half` / `hybrid` (+recipe=cpu_quick) training" in lines   # the recipe it was measured with
    assert lines.index("`resnet50_bert`") < lines.index("`tiny_cnn_half`") < lines.index("`tiny_cnn` /")
    assert "0.25" in lines and "0.47" in lines
