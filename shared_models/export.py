"""Export a checkpoint's encoders in their ecosystems' own formats, with a model card.

`DIR/image/` is a timm hub folder (timm's `save_for_hf`: `config.json` with `architecture`, `num_classes`,
`num_features`, `model_args`, `pretrained_cfg`, and `model.safetensors`), so
`timm.create_model("local-dir:DIR/image", pretrained=True)` rebuilds it; `DIR/text/` is a `save_pretrained`
folder for `AutoModel` / `AutoTokenizer.from_pretrained`; `DIR/README.md` says what the encoders were trained
on and how they did.
"""
from __future__ import annotations

import argparse
import copy
import json
import sqlite3
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.models import save_for_hf
from transformers.models.bert.modeling_bert import BertPooler

from shared_models.checkpoint import CheckpointError, load_checkpoint

IMAGE_DIR, TEXT_DIR, CARD = "image", "text", "README.md"
# What the project's image pipeline does (client/data/cache.py, transforms.py): one channel in [0, 1], the
# short side resized bilinearly, the centred square kept, then (x - 0.5) / 0.5 inside the encoder.
IMAGE_DATA_CONFIG = {"mean": (0.5,), "std": (0.5,), "interpolation": "bilinear", "crop_pct": 1.0,
                     "crop_mode": "center"}
# pretrained_cfg keys timm copies from the architecture's ImageNet weights; they do not describe these weights.
NOT_OURS = ("license", "origin_url", "paper_ids", "notes", "hf_hub_id", "url", "file", "source")


def export_image(encoder, out: Path, source: dict) -> Path:
    """The timm backbone as timm writes a hub folder, plus the keys older fedcxr callers read (`kwargs`, `input`,
    `source`). CNN encoders also get `attention_pool.safetensors`, the pooling head that gives their global
    feature (not part of the timm model)."""
    data_config = {**IMAGE_DATA_CONFIG, "input_size": (1, encoder.img_size, encoder.img_size)}
    # safetensors writes contiguous tensors only; the encoder holds its convolutions channels_last.
    contiguous = copy.deepcopy(encoder.model).to(memory_format=torch.contiguous_format)
    save_for_hf(contiguous, str(out), safe_serialization=True, data_config=data_config)
    config = json.loads((out / "config.json").read_text())
    pretrained_cfg = {k: v for k, v in config["pretrained_cfg"].items() if k not in NOT_OURS}
    config["pretrained_cfg"] = pretrained_cfg | {"tag": "fedcxr"}
    config |= {
        "kwargs": encoder.timm_kwargs,
        "input": {"channels": 1, "range": [0.0, 1.0], "mean": 0.5, "std": 0.5, "size": encoder.img_size},
        "fedcxr_global_embedding": _global_embedding_note(encoder),
        "source": source,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if encoder.attention_pool is not None:
        save_file({k: v.contiguous() for k, v in encoder.attention_pool.state_dict().items()},
                  out / "attention_pool.safetensors")
    return out


def _global_embedding_note(encoder) -> str:
    if encoder.attention_pool is not None:
        return "attention pool (attention_pool.safetensors) over forward_features; timm's own head averages"
    if encoder.global_pool == "avg":
        return "mean of forward_features' patch tokens (after the class token); timm's own head takes the class token"
    return "the class token of forward_features (timm's own head)"


def export_text(text_encoder, tokenizer, out: Path) -> Path:
    """`save_pretrained` of the encoder and tokenizer. The project's encoder has no pooler (`pooler_output` is
    never used); `AutoModel` builds a BERT with one, so an identity pooler is written with it — it loads with no
    missing weights, and `pooler_output` is tanh of the class token, untrained, as the config notes."""
    model = text_encoder.model
    pooler_added = getattr(model, "pooler", "absent") is None
    if pooler_added:
        model.pooler = BertPooler(model.config)
        with torch.no_grad():
            model.pooler.dense.weight.copy_(torch.eye(model.config.hidden_size))
            model.pooler.dense.bias.zero_()
        model.config.fedcxr_pooler = "identity, not trained: pooler_output = tanh(class token)"
    model.config.fedcxr_report_embedding = {
        "cls": "last_hidden_state[:, 0]",
        "mean": "mean of last_hidden_state over attention_mask",
    }[text_encoder.pooling]
    try:
        model.save_pretrained(out)
    finally:
        if pooler_added:
            model.pooler = None
    tokenizer.save_pretrained(out)
    return out


def export(checkpoint_dir: str | Path, out_dir: str | Path, results: list[str | Path] = ()) -> dict[str, Path]:
    """Write out_dir/image/ (timm), out_dir/text/ (transformers) and out_dir/README.md (the model card;
    `results` are evaluation results.json files to quote in it)."""
    model, meta = load_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    source = {"checkpoint": str(checkpoint_dir), "step": meta.get("step"), "round": meta.get("round")}
    image_dir = export_image(model.image_encoder, out / IMAGE_DIR, source)
    text_dir = export_text(model.text_encoder, model.tokenizer, out / TEXT_DIR)
    facts = run_facts(Path(checkpoint_dir), meta)
    for path in results:
        facts["evaluation"][str(path)] = json.loads(Path(path).read_text())
    (out / CARD).write_text(model_card(meta, facts, model.image_encoder))
    return {"image": image_dir, "text": text_dir, "card": out / CARD}


# ----------------------------------------------------------------------------------------- model card
def _run_dir(checkpoint_dir: Path) -> Path:
    """<run>/checkpoint or <run>/checkpoints/round_NNNN -> <run>."""
    checkpoint_dir = checkpoint_dir.resolve()
    if checkpoint_dir.parent.name == "checkpoints":
        return checkpoint_dir.parent.parent
    return checkpoint_dir.parent


def _registry_sites(path: Path, run: str) -> dict[str, dict]:
    """Per site from the run registry's site_metrics (server/registry.py), read-only: rounds joined, examples
    and epsilon of its last round."""
    sites: dict[str, dict] = {}
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT site, round, examples, metrics FROM site_metrics WHERE run = ? "
                                  "ORDER BY round, id", (run,)).fetchall()
    finally:
        connection.close()
    for site, round_, examples, metrics in rows:
        entry = sites.setdefault(site, {"rounds": 0})
        entry["rounds"] += 1
        entry["examples"] = examples
        epsilon = json.loads(metrics or "{}").get("epsilon")
        if epsilon is not None:
            entry["epsilon"] = float(epsilon)
    return sites


def run_facts(checkpoint_dir: Path, meta: dict) -> dict:
    """What the run left beside the checkpoint: per-site rounds and epsilon (the run registry), the run's
    summary.json (simulation, centralized) and its evaluation results."""
    run_dir = _run_dir(checkpoint_dir)
    facts: dict = {"sites": {}, "evaluation": {}, "summary": {}, "unreadable": []}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            facts["summary"] = json.loads(summary_path.read_text())
        except (OSError, ValueError) as error:   # the card says so; the export itself goes on
            facts["unreadable"].append(f"{summary_path}: {error}")
        final = facts["summary"].get("final") or {}
        if isinstance(final.get("federated"), dict):
            facts["evaluation"][str(summary_path)] = final["federated"]
    federation = (meta.get("config") or {}).get("federation") or {}
    registries = [federation.get("registry"), run_dir / "registry.sqlite", run_dir.parent / "registry.sqlite"]
    for path in [Path(p) for p in registries if p and "://" not in str(p)]:
        if meta.get("run") and path.is_file():
            try:
                facts["sites"] = _registry_sites(path, meta["run"])
            except (sqlite3.Error, ValueError) as error:
                facts["unreadable"].append(f"{path}: {error}")
            if facts["sites"]:
                break
    return facts


def _evaluation_lines(results: dict) -> list[str]:
    lines = []
    for fraction, entry in (results.get("linear_probe") or {}).items():
        auc = entry["mean_auc"]
        lines.append(f"linear probe, {float(fraction):.0%} labels: mean AUC {auc['mean']:.3f} ± {auc.get('std', 0):.3f}"
                     f" ({len(auc.get('per_seed', [])) or 1} seed(s))")
    if "zero_shot" in results:
        lines.append(f"zero-shot: mean AUC {results['zero_shot']['mean_auc']:.3f}")
    for fraction, entry in (results.get("segmentation") or {}).items():
        dice = entry["dice_empty_as_one"]
        lines.append(f"segmentation, {float(fraction):.0%} labels: Dice {dice['mean']:.3f} ± {dice.get('std', 0):.3f}")
    if "retrieval" in results:
        r = results["retrieval"]
        lines.append(f"retrieval: image->text R@1/5/10 {r['i2t_r1']:.3f}/{r['i2t_r5']:.3f}/{r['i2t_r10']:.3f}, "
                     f"text->image {r['t2i_r1']:.3f}/{r['t2i_r5']:.3f}/{r['t2i_r10']:.3f}")
    return lines


def _readable_evaluation(results) -> list[str]:
    try:
        return _evaluation_lines(results)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        return [f"not in the results.json shape of contracts.md ({type(error).__name__}: {error}); not quoted"]


def _data_line(meta: dict, summary: dict) -> str:
    """A simulation's summary.json and a centralized checkpoint name their data; a deployment's coordinator never
    sees the sites' data (its config's `data` is only the default group)."""
    if summary.get("config"):
        data = summary["config"].get("data") or {}
    elif meta.get("round") is None:
        data = (meta.get("config") or {}).get("data") or {}
    else:
        return "each site's own data, which the coordinator does not see (sites and their examples below)"
    if data.get("generate"):
        return f"the synthetic phantom ({data.get('studies')} studies, MIMIC-CXR layout); not real patients"
    return f"layout `{data.get('layout')}` at `{data.get('root')}`"


def model_card(meta: dict, facts: dict, image_encoder) -> str:
    config = meta.get("config") or {}
    objective = config.get("objective") or {}
    terms = ", ".join(f"{k} x{v:g}" for k, v in (objective.get("lambdas") or {}).items() if float(v) > 0)
    federation, privacy = config.get("federation") or {}, config.get("privacy") or {}
    sites = facts["sites"] or {s: {"examples": n} for s, n in (meta.get("sites") or {}).items()}
    epsilon = facts["summary"].get("epsilon") or {s: v["epsilon"] for s, v in sites.items() if "epsilon" in v}
    model = config.get("model") or {}
    if meta.get("round") is not None:
        training = (f"federated, round {meta['round']} of {federation.get('rounds')} ({meta.get('strategy') or federation.get('strategy')}, "
                    f"{federation.get('local_steps')} local steps per round), run `{meta.get('run')}`")
    else:
        training = f"centralized, {meta.get('step')} optimizer steps"
    lines = [
        f"# fedcxr encoders: {model.get('name', '?')} ({image_encoder.timm_name} + "
        f"{(model.get('text') or {}).get('name') or 'BERT from config'})", "",
        "Chest radiograph image and report encoders pre-trained with fedcxr. Research use only; not a medical device.",
        "", "## Load", "", "```python",
        "import timm, transformers",
        'image = timm.create_model("local-dir:image", pretrained=True).eval()   # [B, 1, H, W], mean/std 0.5',
        'text, tokenizer = transformers.AutoModel.from_pretrained("text"), transformers.AutoTokenizer.from_pretrained("text")',
        "```", "",
        f"Input: one channel, {image_encoder.img_size} px, in [0, 1] then normalised with mean 0.5 and std 0.5 "
        "(`timm.data.resolve_data_config({}, model=image)` gives this). Global image embedding as trained: "
        f"{_global_embedding_note(image_encoder)}. Report embedding: see `fedcxr_report_embedding` in "
        "`text/config.json`.", "",
        "## Training", "",
        f"- data: {_data_line(meta, facts['summary'])}",
        f"- objective: `{objective.get('name', '?')}` ({terms or 'no terms recorded'})",
        f"- training: {training}",
        f"- privacy: `{privacy.get('name', 'none')}`"
        + (" — epsilon per site: " + ", ".join(f"{s} {e:.2f}" for s, e in epsilon.items()) if epsilon else ""),
    ]
    if sites:
        lines += ["", "| site | rounds joined | examples (last round) | epsilon |", "|---|---|---|---|"]
        for site, v in sorted(sites.items()):
            site_epsilon = f"{v['epsilon']:.2f}" if "epsilon" in v else "-"
            lines.append(f"| {site} | {v.get('rounds', '?')} | {v.get('examples', '?')} | {site_epsilon} |")
    lines += ["", "## Evaluation", ""]
    evaluated = [(where, _readable_evaluation(results)) for where, results in facts["evaluation"].items()]
    evaluated = [(where, found) for where, found in evaluated if found]
    if not evaluated:
        lines.append("None recorded with this checkpoint (`python -m evaluation.run checkpoint=... task=all`, then "
                     "`python -m shared_models.export ... --results results.json`).")
    for where, found in evaluated:
        lines += [f"From `{where}`:", ""] + [f"- {line}" for line in found] + [""]
    lines += ["", f"Fingerprints (model / objective / tokenizer): {meta.get('fingerprints')}", ""]
    lines += [f"Not read (unreadable): {item}" for item in facts["unreadable"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shared_models.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="a checkpoint folder (model.safetensors, meta.json, tokenizer/)")
    parser.add_argument("--out", required=True, help="output folder; image/, text/ and README.md are written inside")
    parser.add_argument("--results", action="append", default=[], metavar="RESULTS_JSON",
                        help="an evaluation results.json to quote in the model card (repeatable)")
    args = parser.parse_args(argv)
    for path in args.results:
        try:
            json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SystemExit(f"error: no such results file: {path}") from None
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: results file {path} is not readable JSON: {error}") from None
    try:
        paths = export(args.checkpoint_dir, args.out, args.results)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"image encoder -> {paths['image']}  (timm.create_model('local-dir:{paths['image']}', pretrained=True))")
    print(f"text encoder  -> {paths['text']}  (AutoModel / AutoTokenizer.from_pretrained)")
    print(f"model card    -> {paths['card']}")


if __name__ == "__main__":
    main()
