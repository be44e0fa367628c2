"""What a site's catalog holds, per site: what a hospital checks before it joins a federation.

`python -m client.data summary --catalog PATH [--json PATH]`: images by status and reason, studies
and patients, report coverage, views, splits, label prevalence, and the data warnings of the last
index run (rows left out, duplicates, conflicting studies).
"""
from __future__ import annotations

from collections import Counter, defaultdict

from sqlalchemy import inspect, select
from sqlalchemy.engine import make_url

from client.data.catalog import Catalog, DataWarning, Image, IndexRun, Study
from client.data.layouts import named_labels

NO_SITE = "(no site)"
WARNINGS_LISTED = 50     # the JSON and the text list this many warnings; counts cover all of them
LABEL_VALUES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}


def catalog_summary(catalog: Catalog) -> dict:
    with catalog.session() as session:
        studies = {row.id: row for row in session.execute(
            select(Study.id, Study.patient_id, Study.split, Study.labels, Study.report_status, Study.report_reason))}
        images = session.execute(select(Image.study_id, Image.site, Image.status, Image.reason, Image.view)).all()
        last_run = session.scalars(select(IndexRun).where(IndexRun.status == "done")
                                   .order_by(IndexRun.id.desc()).limit(1)).first()
        warnings = (session.scalars(select(DataWarning).order_by(DataWarning.code, DataWarning.id)).all()
                    if inspect(catalog.engine).has_table(DataWarning.__tablename__) else [])

    sites: dict[str, dict] = defaultdict(lambda: {"images": Counter(), "rejected": Counter(), "views": Counter(),
                                                  "studies": set(), "usable_images": defaultdict(int)})
    for study_id, site, status, reason, view in images:
        entry = sites[site or NO_SITE]
        entry["images"][status] += 1
        entry["studies"].add(study_id)
        if status == "ok":
            entry["views"][view or "unknown"] += 1
            entry["usable_images"][study_id] += 1
        else:
            entry["rejected"][reason] += 1
    return {
        "catalog": make_url(catalog.url).render_as_string(hide_password=True),
        "last_index_run": None if last_run is None else {
            "id": last_run.id, "layout": last_run.layout, "root": last_run.root,
            "finished_at": last_run.finished_at.isoformat() if last_run.finished_at else None},
        "sites": {site: site_summary(entry, studies) for site, entry in sorted(sites.items())},
        "warnings": {"total": len(warnings), "by_code": dict(sorted(Counter(w.code for w in warnings).items())),
                     "listed": [{"code": w.code, "source": w.source, "line": w.line, "detail": w.detail}
                                for w in warnings[:WARNINGS_LISTED]]},
    }


def site_summary(entry: dict, studies: dict) -> dict:
    """One site's counts; label, split and report figures are over studies with at least one usable image."""
    with_images = [studies[s] for s in sorted(entry["usable_images"]) if s in studies]
    reports = Counter(s.report_status for s in with_images)
    labels: dict[str, Counter] = defaultdict(Counter)
    for study in with_images:
        for name, value in named_labels(study.labels or []).items():
            labels[name]["blank" if value is None else LABEL_VALUES.get(value, str(value))] += 1
    return {
        "images": {"ok": entry["images"]["ok"], "rejected": sum(entry["rejected"].values()),
                   "rejected_by_reason": dict(entry["rejected"].most_common())},
        "studies": len(entry["studies"]),
        "studies_with_usable_images": len(with_images),
        "patients": len({s.patient_id for s in with_images}),
        "usable_studies": reports["ok"],    # a usable image and a usable report: what pre-training reads
        "report_coverage": round(reports["ok"] / len(with_images), 4) if with_images else None,
        "reports_rejected_by_reason": dict(Counter(s.report_reason for s in with_images
                                                   if s.report_status != "ok").most_common()),
        "views": dict(entry["views"].most_common()),
        "splits": dict(Counter(s.split or "none" for s in with_images).most_common()),
        "labels": {name: ordered(counts) for name, counts in sorted(labels.items())
                   if set(counts) != {"blank"}},      # a label nobody filled in says nothing
    }


def ordered(counts: Counter) -> dict:
    """positive, negative, uncertain, a manifest's class names, then blank."""
    rank = {name: n for n, name in enumerate(LABEL_VALUES.values())} | {"blank": len(LABEL_VALUES) + 1}
    return dict(sorted(counts.items(), key=lambda item: (rank.get(item[0], len(LABEL_VALUES)), item[0])))


def format_summary(summary: dict) -> str:
    lines = [f"catalog {summary['catalog']}"]
    run = summary["last_index_run"]
    lines.append(f"last index run: {run['finished_at']} ({run['layout']} at {run['root']})" if run
                 else "no finished index run")
    for site, s in summary["sites"].items():
        images = s["images"]
        lines += [
            f"\nsite {site}: {images['ok']} usable images, {images['rejected']} rejected"
            + (f" ({_counts(images['rejected_by_reason'])})" if images["rejected"] else ""),
            f"  studies: {s['studies_with_usable_images']} with usable images ({s['patients']} patients), "
            f"{s['usable_studies']} also with a usable report"
            + (f" (report coverage {s['report_coverage']:.1%})" if s["report_coverage"] is not None else ""),
        ]
        if s["reports_rejected_by_reason"]:
            lines.append(f"  reports rejected: {_counts(s['reports_rejected_by_reason'])}")
        lines.append(f"  views: {_counts(s['views']) or 'none'}; splits: {_counts(s['splits']) or 'none'}")
        for name, counts in s["labels"].items():
            lines.append(f"  {name}: {_counts(counts)}")
    warnings = summary["warnings"]
    lines.append(f"\ndata warnings: {warnings['total']}" + (f" ({_counts(warnings['by_code'])})"
                                                            if warnings["total"] else ""))
    for w in warnings["listed"]:
        where = f"{w['source']} line {w['line']}" if w["line"] else w["source"]
        lines.append(f"  {w['code']}: {where}: {w['detail']}")
    if warnings["total"] > len(warnings["listed"]):
        lines.append(f"  ... and {warnings['total'] - len(warnings['listed'])} more (SELECT * FROM data_warnings)")
    return "\n".join(lines)


def _counts(counts: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.items())
