"""The simulation's report.md and its plots, from summary.json's content."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

NOT_LOSS = {"examples", "seconds", "steps", "lr", "epsilon", "loss", "setup_s"}
ENCODERS = ("federated", "centralized", "random")


def mean_auc(result: dict | None) -> tuple[str, float] | None:
    """(label fraction, mean AUC) of a results.json's first linear-probe fraction (the privacy sweep's one)."""
    probe = (result or {}).get("linear_probe") or {}
    for fraction, entry in probe.items():
        return fraction, float(entry["mean_auc"]["mean"])
    return None


def loss_terms(rounds: list[dict]) -> list[str]:
    terms = {k for r in rounds for m in r["sites"].values() for k, v in m.items()
             if k not in NOT_LOSS and isinstance(v, (int, float))}
    return (["loss"] if any("loss" in m for r in rounds for m in r["sites"].values()) else []) + sorted(terms)


def plot_site_losses(path: Path, rounds: list[dict]) -> None:
    terms = loss_terms(rounds)
    sites = sorted({s for r in rounds for s in r["sites"]})
    cols = min(3, max(1, len(terms)))
    rows = max(1, math.ceil(len(terms) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, term in zip(axes.flat, terms):
        for site in sites:
            points = [(r["round"], r["sites"][site][term]) for r in rounds if term in r["sites"].get(site, {})]
            if points:
                ax.plot(*zip(*points), marker="o", label=site)
        ax.set_title(term)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("loss per term per site (end of each round's local steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_global(path: Path, rounds: list[dict]) -> None:
    keys = [k for k in ("loss", "linear_probe_mean_auc") if any(k in r["global"] for r in rounds)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["round"], r["global"][key]) for r in rounds if r["global"].get(key) is not None]
        ax.plot(*zip(*points), marker="o")
        ax.set_title({"loss": "examples-weighted loss of the sites", "linear_probe_mean_auc": "global model: probe mean AUC"}[key])
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def aggregate_terms(rounds: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each loss term's examples-weighted mean over the sites that trained it, per round: the aggregate curve."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for term in loss_terms(rounds):
        for r in rounds:
            rows = [(m.get("examples", 1.0), m[term]) for m in r["sites"].values() if term in m]
            weight = sum(w for w, _ in rows)
            if rows and weight > 0:
                curves.setdefault(term, []).append((r["round"], sum(w * v for w, v in rows) / weight))
    return curves


def centralized_curves(training: dict | None) -> dict[str, list[tuple[float, float]]]:
    """The centralized run's per-term loss against its share of the run: every logged step where the run kept its
    history, else the means of its first and last steps (all the baseline's summary records)."""
    training = training or {}
    steps = max(1, int(training.get("steps") or 1))
    curves: dict[str, list[tuple[float, float]]] = {}
    history = training.get("loss_history")
    if history:
        for i, row in enumerate(history):
            for term, value in row.items():
                curves.setdefault(term, []).append(((i + 1) / steps, float(value)))
        return curves
    for share, window in ((0.0, training.get("loss_start") or {}), (1.0, training.get("loss_end") or {})):
        for term, value in window.items():
            curves.setdefault(term, []).append((share, float(value)))
    return curves


def plot_term_curves(path: Path, summary: dict) -> None:
    """One panel per weighted term: the federated aggregate (examples-weighted mean over the sites, at the end of
    each round) and the centralized baseline, against the share of each run's optimizer steps, with the term's
    first step marked. All ten of `hybrid`'s terms appear when every one of them trained."""
    rounds = summary["rounds"]
    federated = aggregate_terms(rounds)
    central = centralized_curves(((summary["final"].get("centralized") or {}).get("training")))
    starts = summary.get("term_starts") or {}
    terms = [t for t in dict.fromkeys([*(starts.get("federated") or {}), *federated, *central]) if t != "loss"]
    if not terms:
        return
    federation = summary["config"].get("federation", {})
    total_rounds = int(federation.get("rounds") or max((r["round"] for r in rounds), default=1))
    fed_steps = (summary.get("schedule", {}).get("federated") or {}).get("steps") or 1
    cols = min(5, len(terms))
    rows = math.ceil(len(terms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax, term in zip(axes.flat, terms):
        if term in federated:
            ax.plot(*zip(*[(r / total_rounds, v) for r, v in federated[term]]), marker="o", ms=3,
                    color="tab:blue", label="federated (sites' mean)")
        if term in central:
            points = central[term]
            if len(points) > 50:   # a per-step history: a running mean of a tenth of the run reads better
                width = max(1, len(points) // 20)
                values = [v for _, v in points]
                points = [(points[i][0], sum(values[max(0, i - width + 1):i + 1]) / len(values[max(0, i - width + 1):i + 1]))
                          for i in range(len(points))]
            ax.plot(*zip(*points), color="tab:orange", lw=1.2, label="centralized")
        start = (starts.get("federated") or {}).get(term)
        if start:
            ax.axvline(start / fed_steps, color="k", lw=0.6, ls=":")
        ax.set_title(term, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    # a DP run's sites send no per-term losses: the first panel with a curve carries the legend, if any has one
    labelled = next((ax for ax in axes.flat if ax.get_legend_handles_labels()[0]), None)
    if labelled is not None:
        labelled.legend(fontsize=6)
    fig.supxlabel("share of the run's optimizer steps (dotted: the term's first step)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def term_start_table(summary: dict) -> str | None:
    """Each weighted term's first step in each arm and whether the run recorded a loss for it (it trained)."""
    starts = summary.get("term_starts") or {}
    if not starts:
        return None
    federated = set(aggregate_terms(summary["rounds"]))
    central = set(centralized_curves((summary["final"].get("centralized") or {}).get("training")))
    arms = [arm for arm in ("federated", "centralized") if arm in starts]
    steps = {arm: (summary.get("schedule", {}).get(arm) or {}).get("steps") for arm in arms}
    lines = ["| term | " + " | ".join(f"{arm}: first step of {steps[arm]} | trained" for arm in arms) + " |",
             "|---|" + "---:|:---:|" * len(arms)]
    trained = {"federated": federated, "centralized": central}
    for term in starts[arms[0]]:
        cells = []
        for arm in arms:
            cells += [str(starts[arm].get(term, "-")), "yes" if term in trained[arm] else "**no**"]
        lines.append(f"| {term} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def site_table(rounds: list[dict]) -> str:
    """Per site: rounds trained, examples, mean seconds per round, and its loss in its first and last round."""
    lines = ["| site | rounds | examples | s per round | loss, first round | loss, last round |",
             "|---|---:|---:|---:|---:|---:|"]
    def value(metrics: dict, key: str) -> float:   # a metric a DP or SecAgg+ site withholds is None or absent
        number = metrics.get(key)
        return float("nan") if number is None else float(number)

    for site in sorted({s for r in rounds for s in r["sites"]}):
        mine = [r["sites"][site] for r in rounds if site in r["sites"]]
        seconds = [value(m, "seconds") for m in mine if m.get("seconds") is not None]
        examples = sum(int(value(m, "examples")) for m in mine if m.get("examples") is not None)
        lines.append(f"| {site} | {len(mine)} | {examples} | "
                     f"{(sum(seconds) / len(seconds)) if seconds else float('nan'):.1f} | "
                     f"{value(mine[0], 'loss'):.4f} | {value(mine[-1], 'loss'):.4f} |")
    return "\n".join(lines)


def per_seed_table(final: dict) -> str | None:
    """The probe's mean AUC per seed at each label fraction: each seed draws the same labelled images for every
    encoder, so a row's differences are the comparison."""
    lines = []
    for fraction in fractions_of(final, "linear_probe"):
        rows = {name: final[name]["linear_probe"][fraction]["mean_auc"].get("per_seed")
                for name in ENCODERS if fraction in ((final.get(name) or {}).get("linear_probe") or {})}
        seeds = max((len(v) for v in rows.values() if v), default=0)
        if seeds < 2:
            continue
        lines += [f"| encoder @ {fraction} | " + " | ".join(f"seed {k}" for k in range(seeds)) + " |",
                  "|---|" + "---:|" * seeds]
        lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for name, values in rows.items() if values]
        lines.append("")
    return "\n".join(lines).strip() or None


# (task in results.json, the per-fraction metric, how the table names it)
FRACTION_METRICS = (("linear_probe", "mean_auc", "linear probe mean AUC"),
                    ("segmentation", "dice_empty_as_one", "segmentation Dice (empty = 1)"))


def fractions_of(final: dict, task: str) -> list[str]:
    """Every label fraction any encoder was evaluated at for `task`, in the order asked for."""
    seen: dict[str, None] = {}
    for name in ENCODERS:
        seen.update(dict.fromkeys((final.get(name) or {}).get(task) or {}))
    return list(seen)


def plot_final(path: Path, final: dict) -> None:
    """Probe mean AUC per encoder, one group of bars per label fraction (error bars: std over seeds)."""
    fractions = fractions_of(final, "linear_probe")
    names = [n for n in ENCODERS if (final.get(n) or {}).get("linear_probe")]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(fractions) * max(1, len(names)) / 2), 3.2))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        probe = final[name]["linear_probe"]
        xs = [i + (k - (len(names) - 1) / 2) * width for i, f in enumerate(fractions) if f in probe]
        means = [probe[f]["mean_auc"]["mean"] for f in fractions if f in probe]
        stds = [probe[f]["mean_auc"].get("std", 0.0) for f in fractions if f in probe]
        bars = ax.bar(xs, means, width, yerr=stds, label=name,
                      color={"federated": "tab:blue", "centralized": "tab:orange"}.get(name, "tab:gray"))
        for bar, value in zip(bars, means):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(fractions)), [f"{f} of labels" for f in fractions])
    ax.axhline(0.5, color="k", lw=0.6, ls="--")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("linear probe mean AUC")
    if names:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(entry: dict) -> str:
    seeds = len(entry.get("per_seed") or [entry["mean"]])
    return f"{entry['mean']:.3f}" + (f" ± {entry['std']:.3f}" if seeds > 1 else "")


def fraction_table(final: dict, task: str, metric: str, title: str) -> str | None:
    """One row per encoder, one column per label fraction (mean ± std over seeds) and its share of centralized."""
    fractions = fractions_of(final, task)
    if not fractions:
        return None
    central = (final.get("centralized") or {}).get(task) or {}
    lines = ["| encoder | " + " | ".join(f"{title} @ {f} | vs centralized" for f in fractions) + " |",
             "|---|" + "---:|---:|" * len(fractions)]
    for name in ENCODERS:
        result = (final.get(name) or {}).get(task)
        if not result:
            continue
        cells = []
        for fraction in fractions:
            entry = (result.get(fraction) or {}).get(metric)
            base = (central.get(fraction) or {}).get(metric)
            cells.append(_cell(entry) if entry else "-")
            cells.append(f"{entry['mean'] / base['mean']:.1%}" if entry and base and base["mean"] > 0 else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_table(summary: dict) -> str:
    """The tables printed at the end: each encoder's probe AUC (and Dice) at every label fraction asked for, mean
    ± std over the seeds, and its share of the centralized encoder's."""
    cfg = summary["config"]
    seeds = cfg.get("seeds", 1)
    fractions = fractions_of(summary["final"], "linear_probe") or fractions_of(summary["final"], "segmentation")
    head = (f"{len(summary['sites'])} sites ({cfg['partition']['name']}), {cfg['model']['name']} / "
            f"{cfg['objective']['name']}, {cfg['federation']['rounds']} rounds x {cfg['federation']['local_steps']} "
            f"local steps; evaluated at {', '.join(fractions) or '-'} of the labels, {seeds} seed"
            f"{'s' if seeds != 1 else ''} (mean ± std over seeds); wall {summary['wall_s']:.0f} s, "
            f"{summary['bytes_sent'] / 1e6:.1f} MB sent")
    tables = [fraction_table(summary["final"], *spec) for spec in FRACTION_METRICS]
    return head + "\n\n" + "\n\n".join(t for t in tables if t)


def rounds_table(rounds: list[dict]) -> str:
    """Per round: sites, examples, the aggregate loss, seconds and the bytes each way."""
    lines = ["| round | sites | examples | loss | seconds | MB to sites | MB from sites |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rounds:
        g = r["global"]
        lines.append(f"| {r['round']} | {len(r['sites'])} | {g.get('examples', '-')} | "
                     f"{g.get('loss', float('nan')):.4f} | {g['seconds']:.1f} | {g.get('bytes_sent', 0) / 1e6:.2f} | "
                     f"{g.get('bytes_received', 0) / 1e6:.2f} |")
    return "\n".join(lines)


def write_report(run_dir: Path, summary: dict, sites_markdown: str) -> Path:
    rounds = summary["rounds"]
    plot_site_losses(run_dir / "loss_per_site.png", rounds)
    plot_global(run_dir / "global_per_round.png", rounds)
    plot_final(run_dir / "final_auc.png", summary["final"])
    plot_term_curves(run_dir / "loss_per_term.png", summary)
    never = {arm: ", ".join(sorted(entry["terms_never_trained"])) or "none"
             for arm, entry in summary.get("schedule", {}).items()}
    schedule = "; ".join(f"{arm} ({summary['schedule'][arm]['steps']} steps along one model): {terms}"
                         for arm, terms in never.items())
    epsilon = ", ".join(f"{site} {e:.2f}" for site, e in summary["epsilon"].items()) or "DP off"
    if summary.get("central_epsilon") is not None:   # site-level DP-FedAvg at the server
        epsilon += f"; central (per site) {summary['central_epsilon']:.2f}"
    federation = summary["config"].get("federation", {})
    strategy = federation.get("strategy", "?")
    per_seed = per_seed_table(summary["final"])
    starts = term_start_table(summary)
    bytes_line = (f"{summary['bytes']['to_sites'] / 1e6:.1f} MB to the sites, {summary['bytes']['to_server'] / 1e6:.1f} MB "
                  f"back")
    if rounds:
        bytes_line += (f" ({summary['bytes']['to_sites'] / 1e6 / len(rounds):.2f} and "
                       f"{summary['bytes']['to_server'] / 1e6 / len(rounds):.2f} MB per round)")
    text = f"""# Simulation report

{final_table(summary)}

![federated vs centralized vs random](final_auc.png)
""" + (f"""
Per probe seed (the same labelled images for every encoder within a seed):

{per_seed}
""" if per_seed else "") + f"""
## Sites (the partition)

{sites_markdown}

## Every term of the objective

![loss per term, federated and centralized](loss_per_term.png)

""" + (f"""Which terms trained from which step (the schedule resolved for each arm's steps; "trained": the run recorded
a loss for the term):

{starts}

""" if starts else "") + f"""Weighted terms the objective schedule never reaches: {schedule or "-"}.

## Rounds ({strategy})

![loss per term per site](loss_per_site.png)

![global per round](global_per_round.png)

{rounds_table(rounds)}

Per site (each round's loss is the mean over its local steps):

{site_table(rounds)}

Bytes over the network: {bytes_line}. Epsilon: {epsilon}. Wall time {summary['wall_s']:.0f} s.
"""
    path = run_dir / "report.md"
    path.write_text(text)
    return path
