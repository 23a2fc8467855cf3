"""Turn measured (plan, peak) rows into table coefficients by least squares: what calibration uses.

The model inside one phase is linear in the coefficients (`sum coef_i x feature_i(plan)`), so a
phase's coefficients follow from peaks measured for that phase over a spread of plans. Memory cannot
be negative: a term whose coefficient comes out below zero is dropped and the rest refitted (the
simplest active-set non-negative least squares, enough for a handful of terms).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from budgets.table import Term
from stages.plan import Plan


@dataclass(frozen=True)
class FitRow:
    """One measurement: the plan it ran, how many photos, and the allocator peak it reached."""

    plan: Plan
    n_refs: int
    peak_bytes: float


@dataclass(frozen=True)
class FitResult:
    terms: tuple[Term, ...]
    max_rel_error: float  # worst |predicted - measured| / measured over the rows


def fit(terms: Sequence[Term], rows: Sequence[FitRow], source: str = "") -> FitResult:
    """Refit the coefficients of `terms` (all summed: one phase plus resident) to `rows`.

    The returned terms keep names, features and conditions, carry the fitted coefficients and are
    marked `measured` with `source`.
    """
    if not rows:
        raise ValueError("fit needs at least one measured row")
    x = np.array([[_unit_bytes(t, r) for t in terms] for r in rows], dtype=np.float64)
    y = np.array([r.peak_bytes for r in rows], dtype=np.float64)
    active = [j for j in range(len(terms)) if np.any(x[:, j] != 0)]
    coef = np.zeros(len(terms))
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if np.all(sol >= 0):
            coef[active] = sol
            break
        active = [j for j, c in zip(active, sol, strict=True) if c >= 0]
    pred = x @ coef
    rel = np.abs(pred - y) / np.maximum(y, 1.0)
    src = source or f"least-squares fit of {len(rows)} measured rows"
    fitted = tuple(dataclasses.replace(t, coef=float(c), kind="measured", source=src)
                   for t, c in zip(terms, coef, strict=True))  # fmt: skip
    return FitResult(fitted, float(rel.max()))


def _unit_bytes(term: Term, row: FitRow) -> float:
    """The term's design-matrix entry for a row: its bytes at coefficient 1 (zero where it does not apply)."""
    return dataclasses.replace(term, coef=1.0).bytes(row.plan, row.n_refs)
