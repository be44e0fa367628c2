"""The site's privacy ledger in its catalog: every round's DP-SGD spend, charged before its update leaves the site."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Float, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from client.data.catalog import Base, Catalog, open_catalog, utcnow
from client.privacy.accountant import Spend, epsilon_spent


class PrivacySpend(Base):
    """One round of DP-SGD at this site. The rows are the accountant's state: every epsilon is recomputed from them."""

    __tablename__ = "privacy_ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site: Mapped[str] = mapped_column(String(64), index=True)   # virtual sites of a simulation may share a catalog
    run_id: Mapped[str] = mapped_column(String(128), index=True)
    round: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    accountant: Mapped[str] = mapped_column(String(16))
    epsilon_run: Mapped[float] = mapped_column(Float)      # this run's rounds so far, composed
    epsilon_total: Mapped[float] = mapped_column(Float)    # every run at this site so far, composed
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class BudgetExceeded(RuntimeError):
    """A round would take the site past its privacy budget; the site reports this instead of an update."""


@dataclass(frozen=True)
class Charge:
    epsilon_run: float
    epsilon_total: float
    delta: float


class PrivacyLedger:
    """One site's ledger in its catalog (SQLAlchemy URL or SQLite path); creates the table if needed."""

    def __init__(self, catalog: Catalog | str | os.PathLike, site: str):
        self.site = site
        self.catalog = open_catalog(catalog)
        PrivacySpend.__table__.create(self.catalog.engine, checkfirst=True)

    def close(self) -> None:
        self.catalog.close()

    def history(self, run_id: str | None = None) -> list[Spend]:
        query = select(PrivacySpend).where(PrivacySpend.site == self.site).order_by(PrivacySpend.id)
        if run_id is not None:
            query = query.where(PrivacySpend.run_id == run_id)
        with self.catalog.session() as session:
            return [(row.noise_multiplier, row.sample_rate, row.steps) for row in session.scalars(query)]

    def rows(self) -> list[PrivacySpend]:
        with self.catalog.session() as session:
            query = select(PrivacySpend).where(PrivacySpend.site == self.site).order_by(PrivacySpend.id)
            return list(session.scalars(query))

    def epsilon(self, delta: float, run_id: str | None = None, accountant: str = "rdp") -> float:
        """Epsilon spent so far at `delta`: this run's rounds, or (run_id None) everything the site ever trained."""
        return epsilon_spent(self.history(run_id), delta, accountant)

    def project(self, run_id: str, spend: Spend, delta: float, accountant: str = "rdp") -> Charge:
        """The epsilons the site would reach after one more round of `spend`, without recording it."""
        return Charge(epsilon_spent(self.history(run_id) + [spend], delta, accountant),
                      epsilon_spent(self.history() + [spend], delta, accountant), delta)

    def charge(self, run_id: str, round: int, spend: Spend, caps: dict, accountant: str = "rdp") -> Charge:
        """Record a round's spend, or raise BudgetExceeded (recording nothing) if it would pass caps['max_epsilon'].

        Called before training starts, so a round is paid for whether or not its update is sent.
        """
        delta, limit = float(caps["max_delta"]), float(caps["max_epsilon"])
        charge = self.project(run_id, spend, delta, accountant)
        if charge.epsilon_total > limit:
            spent = self.epsilon(delta, accountant=accountant)
            raise BudgetExceeded(
                f"round {round} of run {run_id!r} refused: it would take site {self.site}'s privacy spend from "
                f"epsilon {spent:.3f} to {charge.epsilon_total:.3f} at delta {delta:g}, over the budget "
                f"max_epsilon={limit:g} (the site file's privacy.max_epsilon, or a run's tighter cap). "
                "Raise the noise, train fewer steps, or stop training on this site's data."
            )
        noise, rate, steps = spend
        with self.catalog.session() as session, session.begin():
            session.add(PrivacySpend(site=self.site, run_id=run_id, round=int(round), steps=int(steps),
                                     noise_multiplier=float(noise), sample_rate=float(rate), delta=delta,
                                     accountant=accountant, epsilon_run=charge.epsilon_run,
                                     epsilon_total=charge.epsilon_total))
        return charge
