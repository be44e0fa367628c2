"""The site catalog (SQLAlchemy 2 ORM): patients, studies with parsed reports, images, index runs."""
from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, create_engine, event, func, or_, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from shared_models.vocab import CHEXPERT_LABELS

SCHEMA_VERSION = "1"
JSON_OR_NULL = JSON(none_as_null=True)   # Python None is SQL NULL, not the JSON text 'null'
BUSY_TIMEOUT_MS = 30_000


class CatalogError(RuntimeError):
    """The catalog cannot be opened or written (wrong URL, missing folder, read-only path)."""


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class CatalogInfo(Base):
    __tablename__ = "catalog_info"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    studies: Mapped[list["Study"]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id"), index=True)
    split: Mapped[str | None] = mapped_column(String(16), index=True)
    labels: Mapped[list | dict | None] = mapped_column(JSON_OR_NULL)     # CHEXPERT_LABELS order or {column: value}; None = blank
    report: Mapped[str | None] = mapped_column(Text)
    report_sha256: Mapped[str | None] = mapped_column(String(64))
    findings: Mapped[str | None] = mapped_column(Text)
    impression: Mapped[str | None] = mapped_column(Text)
    sentences: Mapped[list | None] = mapped_column(JSON_OR_NULL)
    sentence_section: Mapped[list | None] = mapped_column(JSON_OR_NULL)
    sentence_regions: Mapped[list | None] = mapped_column(JSON_OR_NULL)
    triplets: Mapped[list | None] = mapped_column(JSON_OR_NULL)          # [[region, finding, existence, sentence]]
    tags: Mapped[list | None] = mapped_column(JSON_OR_NULL)              # OBSERVATIONS order: 1 / -1 / 0
    report_status: Mapped[str] = mapped_column(String(16), default="ok")   # ok | rejected
    report_reason: Mapped[str | None] = mapped_column(String(32))
    report_detail: Mapped[str | None] = mapped_column(Text)
    patient: Mapped[Patient] = relationship(back_populates="studies")
    images: Mapped[list["Image"]] = relationship(back_populates="study")


class Image(Base):
    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    path: Mapped[str] = mapped_column(Text)                      # relative to the data root
    size: Mapped[int | None] = mapped_column(Integer)
    mtime_ns: Mapped[int | None] = mapped_column(Integer)
    sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)  # ok | rejected
    reason: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    view: Mapped[str | None] = mapped_column(String(32))
    site: Mapped[str | None] = mapped_column(String(64))
    mask_path: Mapped[str | None] = mapped_column(Text)
    boxes: Mapped[dict | None] = mapped_column(JSON_OR_NULL)              # layout-provided region boxes, if any
    spacing_row: Mapped[float | None] = mapped_column(Float)
    spacing_col: Mapped[float | None] = mapped_column(Float)
    photometric: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(8))
    rows: Mapped[int | None] = mapped_column(Integer)
    cols: Mapped[int | None] = mapped_column(Integer)
    crop_x0: Mapped[int | None] = mapped_column(Integer)
    crop_y0: Mapped[int | None] = mapped_column(Integer)
    crop_x1: Mapped[int | None] = mapped_column(Integer)
    crop_y1: Mapped[int | None] = mapped_column(Integer)
    cache_shard: Mapped[int | None] = mapped_column(Integer)
    cache_offset: Mapped[int | None] = mapped_column(Integer)
    cache_height: Mapped[int | None] = mapped_column(Integer)
    cache_width: Mapped[int | None] = mapped_column(Integer)
    indexed_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    index_run_id: Mapped[int | None] = mapped_column(ForeignKey("index_runs.id"))
    study: Mapped[Study] = relationship(back_populates="images")


class IndexRun(Base):
    __tablename__ = "index_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    layout: Mapped[str] = mapped_column(String(32))
    root: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(16), default="running")   # running | done
    summary: Mapped[dict | None] = mapped_column(JSON_OR_NULL)


class DataWarning(Base):
    """What the last index run found wrong in the layout's lists (rows left out, duplicates, conflicts).

    Replaced by each finished run, so it always describes the data as it is now; `first_run_id`
    tells a warning that is new from one already shown by an earlier run.
    """

    __tablename__ = "data_warnings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(32), index=True)      # errors.REASON_CODES or WARNING_CODES
    source: Mapped[str] = mapped_column(Text)                       # the file (relative to the root) or study
    line: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text)
    first_run_id: Mapped[int | None] = mapped_column(ForeignKey("index_runs.id"))
    last_run_id: Mapped[int | None] = mapped_column(ForeignKey("index_runs.id"))


@dataclass
class Catalog:
    """An open catalog: its engine and a session factory (`with catalog.session() as s: ...`)."""

    url: str
    engine: Engine

    def __post_init__(self):
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()


def catalog_url(url_or_path: str | os.PathLike) -> str:
    """An SQLAlchemy URL for a URL or a plain file path (meaning SQLite)."""
    text = os.fspath(url_or_path)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Several processes (Ray workers, ClientApps) share one catalog: WAL lets readers run beside the
    # writer, the busy timeout makes a writer wait for the lock instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def open_catalog(url_or_path: str | os.PathLike, readonly: bool = False) -> Catalog:
    """Open (creating if needed) the catalog at an SQLAlchemy URL or a plain SQLite file path.

    `readonly=True` is for readers (datasets, evaluation): nothing is created or written.
    """
    if isinstance(url_or_path, Catalog):
        return url_or_path
    url = catalog_url(url_or_path)
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise CatalogError(f"{url_or_path}: not a catalog path or SQLAlchemy URL ({error})") from None
    shown = parsed.render_as_string(hide_password=True)     # messages never echo a database password
    sqlite = parsed.get_backend_name() == "sqlite"
    path = None
    if sqlite and parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        path = Path(parsed.database)
        if readonly and not path.is_file():
            raise CatalogError(f"{path}: no catalog here; index the data first (python -m client.data index)")
        if not path.parent.is_dir():
            raise CatalogError(f"{path}: folder {path.parent} does not exist; create it or choose "
                               "another --catalog path")
        check_sqlite_file(path)
    try:
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000} if sqlite else {})
    except ImportError as error:       # the URL's driver (psycopg2, pymysql, ...) is not installed
        package = error.name or str(error)
        raise CatalogError(f"{shown}: the database driver {package!r} is not installed; "
                           f"pip install {package} into this environment, or use a SQLite file path") from None
    except NoSuchModuleError as error:
        raise CatalogError(f"{shown}: unknown database dialect or driver ({error}); use a SQLite file path or "
                           "a URL such as postgresql+psycopg2://user@host/db") from None
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    if path is not None:
        try:   # SQLite judges the content as it opens the file: another file fails here, in words
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar()
        except DatabaseError as error:
            engine.dispose()
            if "not a database" in str(error.orig):
                raise CatalogError(f"{path}: not an SQLite database (SQLite: {error.orig}); move the file away or "
                                   "choose another --catalog path") from None
            raise CatalogError(f"cannot open the catalog at {path}: {error.orig}") from None
    if readonly:
        return Catalog(url, engine)
    try:
        Base.metadata.create_all(engine)
        # A write probe, so a read-only catalog fails here with a clear message, not mid-index.
        with Session(engine) as session, session.begin():
            session.merge(CatalogInfo(key="schema_version", value=SCHEMA_VERSION))
            session.merge(CatalogInfo(key="opened_for_writing", value=utcnow().isoformat()))
    except DatabaseError as error:     # read-only, not a database, unreachable server, wrong schema
        engine.dispose()
        raise CatalogError(f"cannot write the catalog at {shown}: {error.orig}; "
                           "choose a writable catalog (--catalog PATH)") from None
    return Catalog(url, engine)


def check_sqlite_file(path: Path) -> None:
    """Refuse a path that is not a regular file (a pipe, a folder, a device) before SQLite opens it.

    Only its metadata is read: this process never opens the file beside SQLite, because closing a second descriptor
    of a database file drops every POSIX lock the process holds on it, SQLite's included, and another process may
    then reset the WAL under a live connection here ("database disk image is malformed";
    sqlite.org/howtocorrupt.html, 2.2). Whether a regular file is a database, SQLite says as it opens it."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return                            # a new catalog
    except OSError as error:
        raise CatalogError(f"{path}: cannot be read ({error.strerror}); choose another --catalog path") from None
    if not stat.S_ISREG(status.st_mode):
        kind = "a folder" if stat.S_ISDIR(status.st_mode) else "not a regular file"
        raise CatalogError(f"{path}: not a catalog ({kind}); choose another --catalog path")


# --- cheap listings ----------------------------------------------------------------------------

@dataclass(frozen=True)
class StudyEntry:
    """What partitioning needs about one usable study, without its report text."""

    patient_id: str
    study_id: str
    split: str | None
    labels: list[float]        # CHEXPERT_LABELS order, NaN where blank
    tags: list[float]          # OBSERVATIONS order
    site: str | None
    images: int
    has_report: bool = True    # False: kept for image-only evaluation, left out of pre-training


def in_split(split: str | None | list[str | None]):
    """The SQL condition "the study's split is one of these"; None among them means "no split given" (a manifest
    without a split column leaves every study's split empty)."""
    names = [split] if isinstance(split, str) or split is None else list(split)
    named = Study.split.in_([name for name in names if name is not None])
    return or_(named, Study.split.is_(None)) if None in names else named


def usable_studies(catalog: Catalog, split: str | list[str] | None = None,
                   require_report: bool = True) -> list[StudyEntry]:
    """Studies with at least one `ok` image (and a usable report unless `require_report=False`), by study id."""
    with catalog.session() as session:
        query = (select(Study.patient_id, Study.id, Study.split, Study.labels, Study.tags,
                        func.min(Image.site), func.count(Image.id), Study.report_status)
                 .join(Image, Image.study_id == Study.id)
                 .where(Image.status == "ok")
                 .group_by(Study.id).order_by(Study.id))
        if require_report:
            query = query.where(Study.report_status == "ok")
        if split is not None:
            query = query.where(in_split(split))
        return [StudyEntry(patient, study, study_split, labels_as_floats(labels), list(tags or []), site, n,
                           report_status == "ok")
                for patient, study, study_split, labels, tags, site, n, report_status in session.execute(query)]


def label_values(labels: list | dict | None) -> dict[str, float | str | None]:
    """A study's labels by name: a manifest's {column: value} as stored, a CHEXPERT_LABELS list by name."""
    if isinstance(labels, dict):
        return dict(labels)
    return dict(zip(CHEXPERT_LABELS, labels)) if labels is not None else {}


def labels_as_floats(labels: list | dict | None) -> list[float]:
    """CHEXPERT_LABELS order, NaN where blank, absent or not a number."""
    values = label_values(labels)
    return [float(v) if isinstance(v, (int, float)) else math.nan for v in (values.get(n) for n in CHEXPERT_LABELS)]
