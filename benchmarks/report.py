"""Render benchmark results as markdown tables: one renderer per section, a flat key/value table otherwise."""
from __future__ import annotations

from typing import Callable

RENDERERS: dict[str, Callable[[dict], list[str]]] = {}


def renderer(name: str):
    def register(fn):
        RENDERERS[name] = fn
        return fn

    return register


def fmt(value) -> str:
    """Numbers short and readable: 3 significant digits, FLOP-sized ones in G."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if abs(value) >= 1e7:
        return f"{value / 1e9:.3g} G"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def flatten(body: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in body.items():
        name = f"{prefix}{key}"
        items += flatten(value, name + ".") if isinstance(value, dict) else [(name, value)]
    return items


def key_values(body: dict) -> list[str]:
    return table(["key", "value"], [[key, value] for key, value in flatten(body)])


@renderer("objectives")
def objectives(body: dict) -> list[str]:
    models = [m for m in body if isinstance(body[m], dict) and m != "params" and "clip" in body[m]]
    presets = list(dict.fromkeys(p for m in models for p, v in body[m].items() if isinstance(v, dict)))
    header = ["preset"] + [f"{m} {col}" for m in models for col in ("step s", "vs clip")]
    rows = [[p] + [v for m in models for v in (body[m].get(p, {}).get("step_s"), body[m].get(p, {}).get("ratio_vs_clip"))]
            for p in presets]
    lines = ["Training step time per objective preset (forward + backward + AdamW), relative to `clip`.", ""]
    lines += table(header, rows)
    lines += ["Batch and image size: " + ", ".join(
        f"{m} {body[m].get('batch_size')} x {body[m].get('image_size')} px" for m in models), ""]
    params = body.get("params", {})
    if params:
        components = list(dict.fromkeys(c for counts in params.values() for c in counts))
        lines += ["Parameters (the `hybrid` preset):", ""]
        lines += table(["component"] + list(params), [[c] + [params[m].get(c) for m in params] for c in components])
    return lines


@renderer("hardware")
def hardware(body: dict) -> list[str]:
    overrides = " ".join(body.get("overrides") or [])
    lines = [f"`{body.get('model')}` / `{body.get('objective')}`{f' ({overrides})' if overrides else ''} training "
             f"step, batch {body.get('batch_size')} at {body.get('image_size')} px on {body.get('device')}, vs one "
             f"{body.get('matmul_size')}² fp32 matmul timed in between the steps.", ""]
    lines += table(["train FLOP/s", "matmul FLOP/s", "ratio", "step FLOPs", "step s"],
                   [[body.get("train_flops_per_s"), body.get("matmul_flops_per_s"), body.get("ratio"),
                     body.get("step_flops"), body.get("step_s")]])
    phases = body.get("phases_s", {})
    if phases:
        total = sum(phases.values()) or 1.0
        lines += ["Where the step's time goes, by phase:", ""]
        lines += table(["phase", "seconds", "share"], [[k, v, v / total] for k, v in phases.items()])
    components = body.get("forward_by_component", {})
    if components:
        lines += ["Forward pass by component (FLOPs counted by torch; ratio = its FLOP/s over the matmul's):", ""]
        lines += table(["component", "forward FLOPs", "seconds", "ratio"],
                       [[k, v.get("flops"), v.get("seconds"), v.get("ratio")] for k, v in components.items()])
    kinds = body.get("time_share_by_op_kind", {})
    if kinds:
        lines += ["Operator self time of one forward + backward by kind of work (torch profiler):", ""]
        lines += table(["kind", "share"], [[k, v] for k, v in kinds.items()])
    factors = body.get("ratio_factors", {})
    if factors:
        lines += ["The ratio as a product: share of the step in forward + backward x share of that in matmul/conv "
                  "kernels x those kernels' FLOP/s over the large matmul's:", ""]
        lines += table(list(factors), [list(factors.values())])
    for body in (body.get("models") or {}).values():   # the same figures for the other models measured
        lines += ["", *hardware(body)]
    return lines


@renderer("data")
def data(body: dict) -> list[str]:
    lines = [f"Cache loader (CxrDataset + DataLoader, train transform, collate; {body.get('loader_workers')} workers) "
             f"vs the `{body.get('model')}` training step's consumption, batch {body.get('batch_size')} at "
             f"{body.get('image_size')} px; ratio > 1: the loader is not the bottleneck.", ""]
    lines += table(["cache images/s", "train images/s", "ratio"],
                   [[body.get("cache_images_per_s"), body.get("train_images_per_s"), body.get("ratio")]])
    lines += [f"Indexing the phantom ({body.get('dicoms')} DICOMs, {body.get('phantom_size')} px): "
              f"read_image decodes {fmt(body.get('dicom_decode_images_per_s'))} images/s "
              f"({fmt(body.get('dicom_decode_megapixels_per_s'))} Mpx/s); the whole index (hash, decode, crop, "
              f"resize, cache, report parse) runs at {fmt(body.get('index_files_per_s'))} files/s.", ""]
    syntaxes = body.get("dicom_decode_by_transfer_syntax", {})
    if syntaxes:
        lines += table(["transfer syntax", "images", "images/s"],
                       [[k, v.get("images"), v.get("images_per_s")] for k, v in syntaxes.items()])
    return lines


def _span(bounds: list | None) -> str | None:
    return f"{bounds[0]}-{bounds[1]}" if bounds else None


@renderer("privacy")
def privacy(body: dict) -> list[str]:
    models = {k: v for k, v in body.items() if isinstance(v, dict)}
    lines = [f"DP-SGD training step over the non-DP step of the same model and batch ({body.get('method', '')}); "
             "goal at most 2.0.", ""]
    lines += table(["model", "DP step s", "non-DP step s", "ratio", "ratio min-max", "CPU ratio", "batch", "per_study",
                    "ratio, vmap", "ratio, loop"],
                   [[m, v.get("dp_step_s"), v.get("step_s"), v.get("ratio"), _span(v.get("ratio_range")),
                     v.get("cpu_ratio"), v.get("batch_size"), v.get("per_study"), v.get("vmap_ratio"),
                     v.get("loop_ratio")] for m, v in models.items()])
    return lines


@renderer("memory")
def memory(body: dict) -> list[str]:
    lines = ["Peak resident memory of a fresh process building the model and running training steps "
             "(`hybrid` objective, AdamW).", ""]
    lines += table(["model", "peak RSS MB", "after imports MB", "after build MB", "parameters MB", "batch", "steps"],
                   [[m, v.get("peak_rss_mb"), v.get("after_imports_mb"), v.get("after_build_mb"),
                     v.get("parameters_mb"), v.get("batch_size"), v.get("steps")] for m, v in body.items()])
    return lines


def render_markdown(results: dict) -> str:
    lines = ["# fedcxr benchmarks", "", "Every figure is a rate or a ratio measured within one run "
             "(the machine is shared: compare ratios, not absolute times, across runs).", ""]
    if "machine" in results:
        lines += ["## machine", ""] + key_values(results["machine"])
    for name, body in results.items():
        if name == "machine":
            continue
        lines += [f"## {name}", ""] + RENDERERS.get(name, key_values)(body)
    return "\n".join(lines)
