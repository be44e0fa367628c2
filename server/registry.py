"""The run registry: runs, rounds, per-site metrics, checkpoints and rejected updates (no patient or study ids)."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, ForeignKey, Integer, String, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    name: Mapped[str] = mapped_column(String, primary_key=True)
    flwr_run_id: Mapped[str | None]
    status: Mapped[str] = mapped_column(default="running")  # running | finished | failed
    rounds_planned: Mapped[int]
    config_hash: Mapped[str]
    config: Mapped[dict] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(default=_now)
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None]


class Round(Base):
    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run: Mapped[str] = mapped_column(ForeignKey("runs.name"))
    round: Mapped[int]
    status: Mapped[str]  # complete | too_few_sites | skipped (cyclic: the site asked sent no valid update)
    sites_asked: Mapped[int]
    sites_accepted: Mapped[int]
    seconds: Mapped[float]
    bytes_sent: Mapped[int]
    bytes_received: Mapped[int]
    metrics: Mapped[dict] = mapped_column(JSON)
    finished_at: Mapped[datetime] = mapped_column(default=_now)


class SiteMetrics(Base):
    __tablename__ = "site_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run: Mapped[str] = mapped_column(ForeignKey("runs.name"))
    round: Mapped[int]
    site: Mapped[str]
    node_id: Mapped[str]
    examples: Mapped[int]
    metrics: Mapped[dict] = mapped_column(JSON)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run: Mapped[str] = mapped_column(ForeignKey("runs.name"))
    round: Mapped[int]
    path: Mapped[str]
    sha256: Mapped[str]


class Rejection(Base):
    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run: Mapped[str] = mapped_column(ForeignKey("runs.name"))
    round: Mapped[int]
    site: Mapped[str]
    node_id: Mapped[str]
    problems: Mapped[list] = mapped_column(JSON)


class SiteNode(Base):
    """Which node owns a site name in a run (its first claim), and the examples it declared then."""
    __tablename__ = "site_nodes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run: Mapped[str] = mapped_column(ForeignKey("runs.name"))
    round: Mapped[int]
    site: Mapped[str]
    node_id: Mapped[str]
    examples: Mapped[int]


def open_engine(url_or_path: str | Path) -> Engine:
    """An engine for an SQLAlchemy URL or a plain file path (SQLite in WAL mode, shared by several processes)."""
    text = str(url_or_path)
    if "://" not in text:
        Path(text).parent.mkdir(parents=True, exist_ok=True)
        text = f"sqlite:///{Path(text).resolve()}"
    engine = create_engine(text, connect_args={"timeout": 30} if text.startswith("sqlite") else {})
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

    create_tables(engine)
    return engine


def create_tables(engine, attempts: int = 3) -> None:
    """create_all checks, then creates: two processes opening a new registry at once (the ServerApp and a
    watcher) can both see a table missing; the loser's CREATE fails with "already exists", and a retry,
    which now finds the tables, is all it needs."""
    for attempt in range(attempts):
        try:
            Base.metadata.create_all(engine)
            return
        except OperationalError as error:
            if "already exists" not in str(error) or attempt == attempts - 1:
                raise


class Registry:
    """Writes and reads one registry database; every method is one short transaction."""

    def __init__(self, url_or_path: str | Path):
        self.engine = open_engine(url_or_path)

    def start_run(self, run_name: str, flwr_run_id: str | None, rounds: int, config: dict, config_hash: str) -> None:
        with Session(self.engine) as session, session.begin():
            run = session.get(Run, run_name)
            if run is None:
                session.add(Run(name=run_name, flwr_run_id=flwr_run_id, rounds_planned=rounds, config=config, config_hash=config_hash))
            else:  # a resumed run keeps its history
                run.status, run.flwr_run_id, run.rounds_planned, run.error = "running", flwr_run_id, rounds, None

    def finish_run(self, run_name: str, error: str | None = None) -> None:
        with Session(self.engine) as session, session.begin():
            run = session.get(Run, run_name)
            run.status, run.error, run.finished_at = ("failed" if error else "finished"), error, _now()

    def add_round(self, run: str, round_: int, **fields) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(Round(run=run, round=round_, **fields))

    def add_site_metrics(self, run: str, round_: int, site: str, node_id: int, examples: int, metrics: dict) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(SiteMetrics(run=run, round=round_, site=site, node_id=str(node_id), examples=examples, metrics=metrics))

    def add_checkpoint(self, run: str, round_: int, path: Path, sha256: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(CheckpointRow(run=run, round=round_, path=str(path), sha256=sha256))

    def add_rejection(self, run: str, round_: int, site: str, node_id: int, problems: list[str]) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(Rejection(run=run, round=round_, site=site, node_id=str(node_id), problems=problems))

    def add_site_node(self, run: str, round_: int, site: str, node_id: int, examples: int) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(SiteNode(run=run, round=round_, site=site, node_id=str(node_id), examples=examples))

    def site_nodes(self, run: str) -> list[dict]:
        return self.describe(run)["site_nodes"]

    def runs(self) -> list[Run]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.scalars(select(Run).order_by(Run.started_at)))

    def sites(self, run: str | None = None) -> list[dict]:
        """Per node id and site name (over all runs, or one): the runs, the rounds whose update was accepted, the
        rejected or missed replies of the node, and when it was last seen (the end of the latest round it
        answered). Names come from the sites' replies and the run's bindings (`site_nodes`); a node that never
        answered shows as site "-"."""
        def of_run(model):
            query = select(model)
            return session.scalars(query if run is None else query.where(model.run == run))

        with Session(self.engine) as session:
            ended = {(r.run, r.round): r.finished_at for r in of_run(Round)}
            table: dict[tuple[str, str], dict] = {}

            def row(node_id: str, site: str) -> dict:
                return table.setdefault((node_id, site), {"node_id": node_id, "site": site, "runs": set(),
                                                          "rounds_joined": 0, "rejected": 0, "last_seen": None})

            def seen(entry: dict, run_name: str, round_: int) -> None:
                entry["runs"].add(run_name)
                when = ended.get((run_name, round_))
                if when is not None and (entry["last_seen"] is None or when > entry["last_seen"]):
                    entry["last_seen"] = when

            for binding in of_run(SiteNode):
                row(binding.node_id, binding.site)["runs"].add(binding.run)
            for metrics in of_run(SiteMetrics):
                entry = row(metrics.node_id, metrics.site)
                entry["rounds_joined"] += 1
                seen(entry, metrics.run, metrics.round)
            rejected: dict[str, int] = {}
            unnamed: dict[str, set[str]] = {}   # runs in which a node was asked but never answered with a name
            for rejection in of_run(Rejection):
                rejected[rejection.node_id] = rejected.get(rejection.node_id, 0) + 1
                if rejection.site != f"node {rejection.node_id}":   # it answered, with a name
                    seen(row(rejection.node_id, rejection.site), rejection.run, rejection.round)
                else:
                    unnamed.setdefault(rejection.node_id, set()).add(rejection.run)
            for node_id in set(unnamed) - {node for node, _ in table}:
                row(node_id, "-")["runs"] |= unnamed[node_id]
        for (node_id, _), entry in table.items():
            entry["rejected"] = rejected.get(node_id, 0)
            entry["runs"] = sorted(entry["runs"])
        return sorted(table.values(), key=lambda e: (e["site"] == "-", e["site"], e["node_id"]))

    def describe(self, run_name: str) -> dict:
        """Everything recorded about one run, as plain data."""
        with Session(self.engine) as session:
            run = session.get(Run, run_name)
            if run is None:
                known = ", ".join(r.name for r in session.scalars(select(Run))) or "none"
                raise KeyError(f"no run named {run_name!r} in the registry (known: {known})")

            def rows(model):
                query = select(model).where(model.run == run_name).order_by(model.round, model.id)
                return [{c.name: getattr(r, c.name) for c in model.__table__.columns if c.name not in ("id", "run")}
                        for r in session.scalars(query)]

            return {
                "run": {c.name: getattr(run, c.name) for c in Run.__table__.columns if c.name != "config"},
                "rounds": rows(Round),
                "site_metrics": rows(SiteMetrics),
                "checkpoints": rows(CheckpointRow),
                "rejections": rows(Rejection),
                "site_nodes": rows(SiteNode),
            }


def to_json(data) -> str:
    return json.dumps(data, indent=2, default=str)
