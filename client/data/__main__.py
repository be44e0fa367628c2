"""Command line for a site's data: `index` a layout into the catalog, `summary` of what the catalog holds,
`evaluate-reports` the extractor.

`index --json PATH` writes the contract's keys (indexed, unchanged, rejected, studies, seconds) and,
beside them, the same run counted apart: "images" (indexed, ok, rejected by reason, unchanged,
duplicates), "reports" (read, ok, rejected by reason, unchanged), "rows" (CSV rows left out, by
reason), "warnings" (data warnings now, and how many are new) and "catalog" (images and reports by
status after the run). "rejected" is images plus reports, so one study can count twice there.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from client.data.cache import CacheError
from client.data.catalog import CatalogError, open_catalog
from client.data.layouts import DEFAULT_VIEWS, LAYOUTS, LayoutError, open_layout


def parse_views(text: str) -> list[str] | None:
    """`PA,AP` -> ['PA', 'AP']; `all` or `none` -> no view filter."""
    if text.strip().lower() in {"all", "none", ""}:
        return None
    return [view.strip().upper() for view in text.split(",") if view.strip()]


def at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum of {minimum}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="index a data folder into the catalog and the image cache")
    index.add_argument("--root", required=True, type=Path, help="data folder (holding files/ or the manifest)")
    index.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    index.add_argument("--catalog", required=True, help="SQLAlchemy URL or SQLite file path")
    index.add_argument("--cache", type=Path, help="image cache folder (default: ROOT/fedcxr-image-cache)")
    index.add_argument("--reports", type=Path, help="reports folder or mimic-cxr-reports.zip "
                                                     "(default: beside the images)")
    index.add_argument("--manifest", default="manifest.csv", help="manifest CSV, relative to ROOT")
    index.add_argument("--views", type=parse_views, default=None,
                       help="view filter, e.g. PA,AP, or 'all' (default: PA,AP; no filter for manifests)")
    index.add_argument("--short-side", type=at_least(16), default=256, help="cached image short side in pixels")
    index.add_argument("--max-pixels", type=at_least(1), default=40_000_000,
                       help="refuse larger images before decoding")
    index.add_argument("--workers", type=at_least(0), default=0,
                       help="decode in this many processes (default: this one)")
    index.add_argument("--allow-outside-root", action="store_true",
                       help="read images and reports that the lists place outside --root ('..', absolute paths, "
                            "symlinks leading out); for data on shared storage only")
    index.add_argument("--json", type=Path, help="write the summary JSON here")
    index.set_defaults(run=run_index)

    summary = commands.add_parser("summary", help="what the catalog holds: per-site counts by status, labels, "
                                                  "views, report coverage, data warnings")
    summary.add_argument("--catalog", required=True, help="SQLAlchemy URL or SQLite file path")
    summary.add_argument("--json", type=Path, help="write the summary JSON here")
    summary.set_defaults(run=run_summary)

    # Listed for --help; its arguments belong to client.data.evaluate_reports (see main).
    commands.add_parser("evaluate-reports", add_help=False, help="score the report extractor on IU X-ray "
                        "MeSH tags (--iu-tgz PATH --json PATH)")
    return parser


def run_index(args) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from client.data.index import index_data

    options = {"manifest": args.manifest} if args.layout == "manifest" else {}
    layout = open_layout(args.layout, args.root, args.reports, allow_outside_root=args.allow_outside_root, **options)
    views = args.views if args.views is not None else (None if args.layout == "manifest" else list(DEFAULT_VIEWS))
    catalog = open_catalog(args.catalog)     # a wrong or read-only catalog fails before any work
    studies = layout.studies()
    total = sum(len(study.images) for study in studies)
    cache = args.cache or layout.root / "fedcxr-image-cache"
    with logging_redirect_tqdm(), tqdm(total=total, unit="image", desc="indexing") as bar:
        summary = index_data(layout, catalog, cache, views=views, max_pixels=args.max_pixels,
                             short_side=args.short_side, workers=args.workers, progress=bar.update,
                             studies=studies)
    images, reports, rows = summary["images"], summary["reports"], summary["rows"]
    warnings = summary["warnings"]
    print(f"images: {images['indexed']} indexed this run ({images['ok']} ok, {by_reason(images['rejected'])}), "
          f"{images['unchanged']} unchanged; reports: {reports['read']} read ({reports['ok']} ok, "
          f"{by_reason(reports['rejected'])}), {reports['unchanged']} unchanged; list rows left out: "
          f"{by_reason(rows['rejected'], 'none')}; data warnings: {warnings['total']} ({warnings['new']} new); "
          f"{summary['studies']} studies in the catalog; {summary['seconds']:.1f} s")
    write_json(args.json, summary)
    return 0


def by_reason(counts: dict[str, int], empty: str = "0 rejected") -> str:
    total = sum(counts.values())
    return f"{total} rejected: " + ", ".join(f"{code} {n}" for code, n in counts.items()) if total else empty


def write_json(path: Path | None, value: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2) + "\n")


def run_summary(args) -> int:
    from client.data.summary import catalog_summary, format_summary

    summary = catalog_summary(open_catalog(args.catalog, readonly=True))
    print(format_summary(summary))
    write_json(args.json, summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["evaluate-reports"]:
        from client.data.evaluate_reports import main as evaluate_reports

        return evaluate_reports(argv[1:]) or 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (LayoutError, CatalogError, CacheError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
