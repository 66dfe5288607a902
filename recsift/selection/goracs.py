"""GORACS: group-level coreset selection by optimal transport to a validation set (run as a periodic batch).

Cost between candidate i and validation sample j: C_ij = d_ij / max(d) − λ·g_i / max(g), with d the L2
distance of their embeddings and g the candidate's gradient norm (high-gradient samples are favoured).
The objective of a subset S is the optimal-transport cost between the uniform measure on S and the
uniform measure on the validation set, solved exactly with POT's network simplex (``ot.emd``).

Search: a greedy initialisation (each validation point votes for its cheapest candidate; the most-voted
candidates, then the cheapest on average, fill the subset), then exchange refinement. The dual variables
of the current plan pick the exchanges to try: the members whose mass is most expensive to move (largest
source potential u_i) leave, and the outsiders with the lowest reduced cost min_j (C_ij − v_j) enter. An
exchange is kept only when it lowers the objective, so the objective never increases; at most
``max_exchanges`` exchanges are made and ``exchange_candidates`` pairs are tried per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GoracsResult:
    selected: np.ndarray  # candidate indices
    objective: float
    history: list[float] = field(default_factory=list)  # objective after initialisation and each kept exchange
    tried: int = 0


def cost_matrix(candidates: np.ndarray, validation: np.ndarray, grad_norms: np.ndarray | None, lam: float) -> np.ndarray:
    import ot  # POT: imported on use, as in recsift.selection.drift

    d = ot.dist(np.asarray(candidates, dtype=np.float64), np.asarray(validation, dtype=np.float64), metric="euclidean")
    d = d / d.max() if d.max() > 0 else d
    if grad_norms is not None and lam:
        g = np.asarray(grad_norms, dtype=np.float64)
        if not np.isfinite(g).all():
            raise ValueError("gradient norms must be finite")
        d = d - lam * (g / g.max() if g.max() > 0 else g)[:, None]
    return d


def objective(cost: np.ndarray, subset: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """OT cost between uniform measures on ``subset`` (rows) and all columns; and the duals (u, v)."""
    import ot

    c = cost[subset]
    a = np.full(len(subset), 1.0 / len(subset))
    b = np.full(cost.shape[1], 1.0 / cost.shape[1])
    plan, log = ot.emd(a, b, c, log=True)
    return float((plan * c).sum()), log["u"], log["v"]


def goracs_select(candidates: np.ndarray, validation: np.ndarray, size: int, grad_norms: np.ndarray | None = None,
                  lam: float = 0.1, max_exchanges: int = 20, exchange_candidates: int = 5) -> GoracsResult:
    """Choose ``size`` candidates (indices) whose uniform measure is OT-closest to the validation set."""
    n = len(candidates)
    if not 0 < size <= n:
        raise ValueError(f"size must be in [1, {n}]")
    if not len(validation):
        raise ValueError("the validation set is empty")
    cost = cost_matrix(candidates, validation, grad_norms, lam)
    votes = np.bincount(cost.argmin(axis=0), minlength=n)
    order = np.lexsort((cost.mean(axis=1), -votes))  # most votes first, then cheapest on average
    subset = np.sort(order[:size])
    best, u, v = objective(cost, subset)
    result = GoracsResult(subset, best, [best])
    made = 0
    while made < max_exchanges and size < n:
        inside = np.zeros(n, dtype=bool)
        inside[subset] = True
        outside = np.flatnonzero(~inside)
        reduced = (cost[outside] - v[None, :]).min(axis=1)
        enter = outside[np.argsort(reduced)[:exchange_candidates]]
        leave = subset[np.argsort(-u)[:exchange_candidates]]
        improved = False
        for out_i, in_i in zip(leave, enter, strict=False):
            trial = np.sort(np.where(subset == out_i, in_i, subset))
            result.tried += 1
            value, tu, tv = objective(cost, trial)
            if value < best - 1e-12:
                subset, best, u, v = trial, value, tu, tv
                result.history.append(best)
                made += 1
                improved = True
                break
        if not improved:
            break
    result.selected, result.objective = subset, best
    return result
