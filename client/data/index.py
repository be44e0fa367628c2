"""Incremental, resumable indexing of a layout into the catalog and the preprocessing cache."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.engine import make_url

from client.data.cache import ImageCache, to_cache_image
from client.data.catalog import (Catalog, CatalogInfo, DataWarning, Image, IndexRun, Patient, Study, open_catalog,
                                 utcnow)
from client.data.errors import REASON_CODES, Rejected
from client.data.files import check_regular, open_regular, resolve_inside
from client.data.layouts import DEFAULT_VIEWS, ImageRecord, Layout, Problem, StudyRecord, view_allowed

log = logging.getLogger(__name__)

COMMIT_EVERY = 32   # images per transaction: what a killed run loses and redoes
EXAMPLES_PER_WARNING = 3   # a data warning's log line names this many of its rows; the catalog keeps all


def max_file_bytes(max_pixels: int) -> int:
    """The largest image file read: 4 bytes a pixel (uncompressed 16-bit with room) plus 64 MiB of header."""
    return 4 * max_pixels + (64 << 20)


@dataclass
class KnownImage:
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    status: str
    reason: str | None
    view: str | None
    cached: bool        # its pixels are still in the cache (False: the cache was deleted or moved)


def sha256_file(path: Path, max_bytes: int | None = None, inside: Path | None = None) -> str:
    """The file's hash, read through the data layer's checks (regular file, size, still inside the root)."""
    digest = hashlib.sha256()
    with open_regular(path, max_bytes, inside=inside) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_image(path: Path, view: str | None, views, max_pixels: int, fields: dict) -> np.ndarray:
    """Pixels in [0, 1] of an image that passes the view filter; fills `fields`; raises Rejected.

    Without a view in the metadata, the header says which view it is before any pixel is decoded.
    """
    from client.data.images import read_header, read_image

    if view is None and views is not None:
        view = read_header(path, max_pixels=max_pixels).view_position
    fields["view"] = view
    if not view_allowed(view, views):
        raise Rejected("filtered_view", f"view {view or 'unknown'} is not one of {', '.join(views)}")
    loaded = read_image(path, max_pixels=max_pixels)
    spacing = loaded.pixel_spacing or (None, None)
    fields.update(view=view or loaded.view_position, photometric=loaded.photometric, source=loaded.source,
                  rows=int(loaded.pixels.shape[0]), cols=int(loaded.pixels.shape[1]),
                  spacing_row=spacing[0], spacing_col=spacing[1])
    return loaded.pixels


@dataclass
class FileResult:
    """What one file's inspection found, small enough to send back from a worker process."""

    fields: dict
    pixels: np.ndarray | None = None          # uint8 cache image when the file is usable
    failure: tuple[str, str] | None = None    # (reason code, detail) when it is not
    same_content: bool = False                # hash equals the catalog's: nothing was decoded


def inspect_file(path: Path, view: str | None, views, max_pixels: int, short_side: int | None,
                 known_sha256: str | None, inside: Path | None = None) -> FileResult:
    """Hash, then (unless the content is what the catalog already has) decode, crop and resize one file.

    Top-level and free of the catalog, so worker processes can run it.
    """
    fields = {"view": view}
    try:
        fields["sha256"] = sha256_file(path, max_file_bytes(max_pixels), inside)
    except Rejected as error:
        return FileResult(fields, failure=(error.code, error.detail))
    except OSError as error:
        return FileResult(fields, failure=("unreadable_path", f"{path}: {error}"))
    if known_sha256 is not None and fields["sha256"] == known_sha256:
        return FileResult(fields, same_content=True)
    try:
        pixels = decode_image(path, view, views, max_pixels, fields)
    except Rejected as error:
        return FileResult(fields, failure=(error.code, error.detail))
    except Exception as error:   # a reader bug must not stop the site's indexing
        log.exception("%s: unexpected error while decoding", path)
        return FileResult(fields, failure=("internal_error", f"{path}: {type(error).__name__}: {error}"))
    cached, (x0, y0, x1, y1) = to_cache_image(pixels, short_side)
    fields.update(crop_x0=x0, crop_y0=y0, crop_x1=x1, crop_y1=y1)
    return FileResult(fields, pixels=cached)


def printable(text: str) -> str:
    """`text` with the bytes of a non-UTF-8 file name (os's surrogate escapes) as \\xNN, so the catalog can store it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def parser_fingerprint() -> str:
    """Changes whenever the report parser or the vocabularies change, so stored parses are redone."""
    import client.data.report_lexicon
    import client.data.reports
    import shared_models.vocab

    digest = hashlib.sha256()
    for module in (client.data.reports, client.data.report_lexicon, shared_models.vocab):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _inspect(arguments: tuple) -> FileResult:
    return inspect_file(*arguments)


class Pending(NamedTuple):
    """An image whose file must be read: what the catalog knows and the arguments of inspect_file."""

    record: ImageRecord
    known: KnownImage | None
    fields: dict
    work: tuple


class Indexer:
    """One indexing run: walks the layout's studies, writing changed rows in small transactions."""

    def __init__(self, layout: Layout, catalog: Catalog, cache: ImageCache, views, max_pixels: int,
                 short_side: int | None, commit_every: int):
        self.layout, self.catalog, self.cache = layout, catalog, cache
        self.views = list(views) if views is not None else None
        self.max_pixels, self.short_side, self.commit_every = max_pixels, short_side, commit_every
        self.counts = Counter()
        self.rejected = Counter()                   # images and reports, as the contract's "rejected"
        self.image_rejected, self.report_rejected = Counter(), Counter()
        self.reports = Counter()                    # read (ok or rejected) / unchanged
        self.problems: list[Problem] = list(getattr(layout, "problems", []))
        self.inside = None if getattr(layout, "allow_outside_root", False) else layout.root
        self.folders: dict[str, str] = {}          # real path of each folder, for this run only

    def load_known(self, session) -> None:
        shard_sizes = self.cache.shard_sizes() if self.cache.directory.is_dir() else {}
        self.known_images: dict[str, KnownImage] = {}
        for row in session.execute(select(Image.id, Image.path, Image.size, Image.mtime_ns, Image.sha256,
                                          Image.status, Image.reason, Image.view, Image.cache_shard,
                                          Image.cache_offset, Image.cache_height, Image.cache_width)):
            cached = row.cache_shard is not None and shard_sizes.get(row.cache_shard, -1) >= (
                row.cache_offset + row.cache_height * row.cache_width)
            self.known_images[row.id] = KnownImage(row.path, row.size, row.mtime_ns, row.sha256, row.status,
                                                   row.reason, row.view, cached)
        self.known_studies = {row.id: row for row in session.execute(
            select(Study.id, Study.patient_id, Study.split, Study.labels, Study.report_sha256,
                   Study.report_status, Study.report_reason))}
        self.known_patients = set(session.scalars(select(Patient.id)))
        stored = session.get(CatalogInfo, "report_parser")
        self.parser = parser_fingerprint()
        self.parser_changed = stored is not None and stored.value != self.parser
        if self.parser_changed:
            log.info("the report parser changed since the last index: every report is parsed again")

    def run(self, studies: Iterable[StudyRecord], progress: Callable[[int], None] | None = None,
            workers: int = 0) -> None:
        studies = self.without_duplicates(studies)
        pool = None
        if workers > 1:
            # spawn, not fork: the parent holds a database connection, a file lock and tqdm's thread.
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            with self.catalog.session() as session:
                self.run_row = IndexRun(layout=self.layout.name, root=str(self.layout.root))
                session.add(self.run_row)
                session.commit()
                self.load_known(session)
                for batch in batches(studies, max(self.commit_every, 4 * workers)):
                    self.run_batch(session, batch, pool)
                    self.commit(session)
                    if progress:
                        progress(sum(len(study.images) for study in batch))
                # Only a finished run vouches that every stored parse is this parser's.
                session.merge(CatalogInfo(key="report_parser", value=self.parser))
                self.mark_unlisted(session)
                self.drop_empty_studies(session)
                self.record_warnings(session)
                session.commit()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def without_duplicates(self, studies: Iterable[StudyRecord]) -> list[StudyRecord]:
        """The studies with each image id listed once (the first entry kept); a study left with no image goes."""
        seen: dict[str, str] = {}
        self.listed = seen          # every image id the data lists this run
        kept = []
        for study in studies:
            images = []
            for record in study.images:
                first = seen.setdefault(printable(record.image_id), study.study_id)
                if first == study.study_id and all(r.image_id != record.image_id for r in images):
                    images.append(record)
                else:
                    self.counts["duplicates"] += 1
                    self.problems.append(Problem("duplicate_image", record.path, None,
                                                 f"image id {record.image_id} is listed again in study "
                                                 f"{study.study_id}; the entry in study {first} is kept"))
            if study.images and not images:
                self.problems.append(Problem("study_without_images", study.study_id, None,
                                             f"study {study.study_id}: each of its images is listed under "
                                             "another study; the study is left out"))
                continue
            study.images = images
            kept.append(study)
        return kept

    def mark_unlisted(self, session) -> None:
        """Images an earlier run indexed that this run's lists no longer hold: rejected, so a removed row
        (or one now refused) stops being used. Only a finished run gets here: it has seen the whole list."""
        unlisted = [image_id for image_id, known in self.known_images.items()
                    if image_id not in self.listed and known.reason != "no_longer_listed"]
        for start in range(0, len(unlisted), 500):    # below SQLite's limit on bound parameters
            session.execute(update(Image).where(Image.id.in_(unlisted[start:start + 500])).values(
                status="rejected", reason="no_longer_listed", cache_shard=None, cache_offset=None,
                cache_height=None, cache_width=None, index_run_id=self.run_row.id,
                detail="the data no longer lists this image (its row was removed or is now left out)"))
        if unlisted:
            self.rejected["no_longer_listed"] += len(unlisted)
            self.image_rejected["no_longer_listed"] += len(unlisted)
            log.warning("%d images indexed earlier are no longer listed by the data and are not used any more "
                        "(e.g. %s)", len(unlisted), ", ".join(unlisted[:EXAMPLES_PER_WARNING]))

    def drop_empty_studies(self, session) -> None:
        """Studies (and then patients) no image row points at any more: left behind by edited lists."""
        empty = ~exists().where(Image.study_id == Study.id)
        dropped = session.execute(delete(Study).where(empty)).rowcount
        session.execute(delete(Patient).where(~exists().where(Study.patient_id == Patient.id)))
        if dropped:
            log.info("removed %d studies that no listed image belongs to any more", dropped)

    def record_warnings(self, session) -> None:
        """Replace the catalog's data warnings with this run's; log only the new ones, once per code."""
        known = {(w.code, w.source, w.line, w.detail): w for w in session.scalars(select(DataWarning))}
        current = {(p.code, p.source, p.line, p.detail) for p in self.problems}
        new = Counter()
        examples: dict[str, list[str]] = {}
        for key in sorted(current, key=lambda k: (k[0], k[1], k[2] or 0)):
            row = known.pop(key, None)
            if row is None:
                code, source, line, detail = key
                session.add(DataWarning(code=code, source=source, line=line, detail=detail,
                                        first_run_id=self.run_row.id, last_run_id=self.run_row.id))
                new[code] += 1
                examples.setdefault(code, []).append(f"{source}{f' line {line}' if line else ''}: {detail}")
            else:
                row.last_run_id = self.run_row.id
        for gone in known.values():                 # fixed in the data since the last run
            session.delete(gone)
        self.counts["warnings"], self.counts["new_warnings"] = len(current), sum(new.values())
        for code, count in sorted(new.items()):
            shown = "; ".join(examples[code][:EXAMPLES_PER_WARNING])
            more = f" (and {count - EXAMPLES_PER_WARNING} more)" if count > EXAMPLES_PER_WARNING else ""
            log.warning("%d new data warning(s) %s: %s%s; all of them: python -m client.data summary --catalog %s",
                        count, code, shown, more, make_url(self.catalog.url).render_as_string(hide_password=True))
        if len(current) > sum(new.values()):
            log.info("%d data warnings unchanged since an earlier run", len(current) - sum(new.values()))

    def run_batch(self, session, batch: list[StudyRecord], pool) -> None:
        plans = []
        for study in batch:
            self.index_study(session, study)
            plans.extend(plan for record in study.images
                         if (plan := self.plan_image(session, study, record)) is not None)
        work = [plan.work for plan in plans]
        results = pool.map(_inspect, work) if pool is not None else map(_inspect, work)
        for plan, result in zip(plans, results):
            self.apply(session, plan, result)

    def commit(self, session) -> None:
        # Pixels reach the shard file before the rows that point at them are committed.
        self.cache.flush()
        session.commit()

    # --- studies -------------------------------------------------------------------------------

    def index_study(self, session, study: StudyRecord) -> None:
        study.patient_id, study.study_id = printable(study.patient_id), printable(study.study_id)
        if study.patient_id not in self.known_patients:
            session.add(Patient(id=study.patient_id))
            self.known_patients.add(study.patient_id)
        known = self.known_studies.get(study.study_id)
        try:
            text, failure = self.layout.read_report(study), None
        except Rejected as error:
            text, failure = None, error
        sha = hashlib.sha256(text.encode()).hexdigest() if text is not None else None
        report_unchanged = known is not None and not self.parser_changed and (
            (sha is not None and known.report_sha256 == sha)
            or (failure is not None and known.report_reason == failure.code))
        if report_unchanged:
            self.reports["unchanged"] += 1
        if known is not None and report_unchanged and (known.patient_id, known.split, known.labels) == (
                study.patient_id, study.split, study.labels):
            return
        row = session.get(Study, study.study_id) if known is not None else None
        if row is None:
            row = Study(id=study.study_id)
            session.add(row)
        row.patient_id, row.split, row.labels = study.patient_id, study.split, study.labels
        if not report_unchanged:
            self.set_report(row, text, sha, failure, study)

    def set_report(self, row: Study, text: str | None, sha: str | None, failure: Rejected | None,
                   study: StudyRecord) -> None:
        from client.data.reports import parse_report

        row.report, row.report_sha256 = text, sha
        row.findings = row.impression = row.sentences = row.sentence_section = None
        row.sentence_regions = row.triplets = row.tags = None
        if failure is None:
            try:
                parsed = parse_report(text)
            except Rejected as error:
                failure = error
            except Exception as error:   # a parser bug must not stop the site's indexing
                log.exception("report parser failed on study %s", study.study_id)
                failure = Rejected("internal_error", f"report parser: {type(error).__name__}: {error}")
            else:
                row.findings, row.impression = parsed.sections.findings, parsed.sections.impression
                row.sentences, row.sentence_section = list(parsed.sentences), list(parsed.sentence_section)
                row.sentence_regions = [int(r) for r in parsed.sentence_regions]
                row.triplets = [[t.region, t.finding, t.existence, t.sentence] for t in parsed.triplets]
                row.tags = [float(v) for v in parsed.tags]
        if failure is None:
            row.report_status, row.report_reason, row.report_detail = "ok", None, None
            self.reports["ok"] += 1
        else:
            row.report_status, row.report_reason, row.report_detail = "rejected", failure.code, failure.detail
            self.rejected[failure.code] += 1
            self.report_rejected[failure.code] += 1
            log.warning("study %s report: %s (%s)", study.study_id, failure.code, failure.detail)

    # --- images --------------------------------------------------------------------------------

    def plan_image(self, session, study: StudyRecord, record: ImageRecord) -> Pending | None:
        """Settle what needs no reading (duplicates, missing or unchanged files); else the file's work."""
        odd_name = printable(record.path) != record.path
        record.image_id, record.path = printable(record.image_id), printable(record.path)
        known = self.known_images.get(record.image_id)
        fields = dict(study_id=study.study_id, path=record.path, site=record.site,
                      mask_path=self.contained_mask(record), boxes=record.boxes,
                      view=record.view or (known.view if known else None))
        if study.conflict:
            return self.finish(session, record, known, fields, Rejected("conflicting_study", study.conflict))
        if odd_name:
            return self.finish(session, record, known, fields, Rejected(
                "unreadable_path", f"{record.path}: the file name is not valid UTF-8 (shown as \\xNN); rename the file"))
        try:
            # Inside the root, a regular file (a pipe would block, a device never end), of a size worth reading.
            path = resolve_inside(self.layout.root, record.path, self.inside is None, self.folders)
            stat = check_regular(path, max_file_bytes(self.max_pixels))
        except Rejected as failure:
            return self.finish(session, record, known, fields, failure)
        fields |= dict(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        reusable = known is not None and known.path == record.path and self.still_valid(known, fields["view"])
        if reusable and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            self.counts["unchanged"] += 1
            return None
        work = (path, record.view, self.views, self.max_pixels, self.short_side,
                known.sha256 if reusable else None, self.inside)
        return Pending(record, known, fields, work)

    def contained_mask(self, record: ImageRecord) -> str | None:
        """The listed mask path when it stays inside the root; else none, with a warning (the image is still used)."""
        if record.mask_path is None:
            return None
        try:
            resolve_inside(self.layout.root, record.mask_path, self.inside is None, self.folders)
        except Rejected as failure:
            self.problems.append(Problem(failure.code, record.path, None, f"mask_path left out: {failure.detail}"))
            return None
        return record.mask_path

    def apply(self, session, plan: Pending, result: FileResult) -> None:
        record, known, fields = plan.record, plan.known, plan.fields
        if result.same_content:
            # Touched but identical: remember the new size and mtime, nothing was decoded.
            self.update_row(session, record.image_id, known, size=fields["size"], mtime_ns=fields["mtime_ns"])
            self.counts["unchanged"] += 1
            return
        fields |= {name: value for name, value in result.fields.items() if value is not None or name != "view"}
        if result.failure is not None:
            return self.finish(session, record, known, fields, Rejected(*result.failure))
        entry = self.cache.append(result.pixels)
        fields |= dict(cache_shard=entry.shard, cache_offset=entry.offset, cache_height=entry.height,
                       cache_width=entry.width)
        self.finish(session, record, known, fields, None)

    def still_valid(self, known: KnownImage, view: str | None) -> bool:
        """Whether a stored outcome still holds under this run's view filter."""
        if known.status == "ok":
            return known.cached and view_allowed(view, self.views)
        if known.reason == "no_longer_listed":      # listed again: its pixels are no longer in the catalog
            return False
        return known.reason != "filtered_view" or not view_allowed(view, self.views)

    def finish(self, session, record: ImageRecord, known: KnownImage | None, fields: dict,
               failure: Rejected | None) -> None:
        if failure is not None:
            if known is not None and known.status == "rejected" and known.reason == failure.code \
                    and known.sha256 == fields.get("sha256") and known.path == record.path:
                self.counts["unchanged"] += 1      # the same bad file as last time
                self.update_row(session, record.image_id, known, **fields)
                return
            fields |= dict(status="rejected", reason=failure.code, detail=failure.detail, cache_shard=None,
                           cache_offset=None, cache_height=None, cache_width=None)
            self.rejected[failure.code] += 1
            self.image_rejected[failure.code] += 1
            # A view outside the filter is policy, not a bad file: counted, not shouted about.
            level = logging.DEBUG if failure.code == "filtered_view" else logging.WARNING
            log.log(level, "%s: %s (%s)", record.path, failure.code, failure.detail)
        else:
            fields |= dict(status="ok", reason=None, detail=None)
        self.counts["indexed"] += 1
        self.update_row(session, record.image_id, known, **fields)

    def update_row(self, session, image_id: str, known: KnownImage | None, **fields) -> None:
        row = session.get(Image, image_id) if known is not None else None
        if row is None:
            row = Image(id=image_id)
            session.add(row)
        for name, value in fields.items():
            setattr(row, name, value)
        if "status" in fields:      # a new outcome, not a refreshed mtime
            row.indexed_at, row.index_run_id = utcnow(), self.run_row.id


def separate_counts(indexer: Indexer, session) -> dict:
    """Images, reports and list rows counted apart (the contract's "rejected" adds images and reports up).

    "images" and "reports" count this run's work; "catalog" what the catalog holds after it.
    """
    rejected_images = sum(indexer.image_rejected.values())
    row_problems = Counter(p.code for p in indexer.problems if p.code in REASON_CODES and p.line)
    return {
        "images": {"indexed": indexer.counts["indexed"], "ok": indexer.counts["indexed"] - rejected_images,
                   "rejected": dict(sorted(indexer.image_rejected.items())), "unchanged": indexer.counts["unchanged"],
                   "duplicates": indexer.counts["duplicates"]},
        "reports": {"read": indexer.reports["ok"] + sum(indexer.report_rejected.values()),
                    "ok": indexer.reports["ok"], "rejected": dict(sorted(indexer.report_rejected.items())),
                    "unchanged": indexer.reports["unchanged"]},
        "rows": {"rejected": dict(sorted(row_problems.items()))},
        "warnings": {"total": indexer.counts["warnings"], "new": indexer.counts["new_warnings"]},
        "catalog": {
            "images": dict(session.execute(select(Image.status, func.count()).group_by(Image.status)).all()),
            "reports": dict(session.execute(select(Study.report_status, func.count())
                                            .group_by(Study.report_status)).all()),
        },
    }


def batches(studies: Iterable[StudyRecord], images: int) -> Iterable[list[StudyRecord]]:
    """Whole studies, grouped until each group holds at least `images` images."""
    batch, count = [], 0
    for study in studies:
        batch.append(study)
        count += len(study.images)
        if count >= images:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch


def index_data(layout: Layout, catalog, cache_dir, views=DEFAULT_VIEWS, max_pixels: int = 40_000_000,
               short_side: int | None = 256, commit_every: int | None = None, workers: int = 0,
               progress: Callable[[int], None] | None = None, studies: list[StudyRecord] | None = None) -> dict:
    """Index `layout` into the catalog and cache; returns the contract's summary dict.

    Only new or changed files are decoded (size and mtime first, then the content hash); every
    rejected file or report is recorded with its reason code. Killed half-way, a re-run completes
    the work: at most the last uncommitted batch of images is done again. `workers` > 1 decodes in
    that many processes; the catalog and the cache are written by this one only.
    """
    start = time.perf_counter()
    catalog = open_catalog(catalog)
    studies = layout.studies() if studies is None else studies
    with ImageCache(cache_dir) as cache:
        cache.open_for_writing()
        indexer = Indexer(layout, catalog, cache, views, max_pixels, short_side, commit_every or COMMIT_EVERY)
        indexer.run(studies, progress, workers)
        with catalog.session() as session:
            summary = {"indexed": indexer.counts["indexed"], "unchanged": indexer.counts["unchanged"],
                       "rejected": dict(sorted(indexer.rejected.items())),
                       "studies": session.scalar(select(func.count(Study.id))),
                       "duplicates": indexer.counts["duplicates"],
                       "seconds": round(time.perf_counter() - start, 3),
                       **separate_counts(indexer, session)}
            run = session.get(IndexRun, indexer.run_row.id)
            run.status, run.finished_at, run.summary = "done", utcnow(), summary
            session.commit()
    return summary
