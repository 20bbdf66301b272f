"""A multi-label linear head fitted on frozen embeddings: one L2-regularised logistic regression per tag.

The probe of Kumar et al. (2022) and the first phase of LP-FT, and what ``mltag train-head`` fits
on the embeddings already stored in the tag table. Pure functions of arrays, no I/O:

- the tags are fitted jointly by full-batch L-BFGS (the loss is a sum over tags of independent
  problems, so the joint optimum is each tag's own logistic regression, and one L-BFGS call does
  the whole head in a few hundred matrix products);
- features are standardised on the training rows before fitting (L-BFGS converges in far fewer
  steps, and one L2 strength suits every feature) and the scaling is folded back into the weights,
  so the head applies to the raw embeddings: ``scores = sigmoid(E @ W.T + b)``, exactly what
  ``mltag.tagger.model.Tagger.head`` (an ``nn.Linear``) computes;
- the L2 strength is chosen on a validation split from a grid (macro mAP), strongest first with
  warm starts; ``l2`` is the coefficient of ``0.5 * ||w||^2`` added to each tag's mean BCE, i.e.
  scikit-learn's ``C = 1 / (l2 * n_train)`` on standardised features;
- optionally a class-balanced positive weight ``((N - P) / P) ** balance`` per tag;
- deterministic: float64 on the CPU, zero start, no sampling.

Example:
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 8)); y = (x[:, :2] > 0).astype(np.float32)
    >>> head = fit_head(x, y, l2=1e-3)
    >>> head.weight.shape, head.bias.shape
    ((2, 8), (2,))
    >>> bool((head.scores(x) > 0.5).astype(np.float32).mean(axis=0).min() > 0.3)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mltag.maths.metrics import mean_average_precision, per_tag_average_precision

# Half-decades from nearly unregularised to strongly regularised. On 1,400 real photos with
# 1,280-d features the best value sits near the strong end (a probe overfits otherwise), on large
# labelled sets near the weak end: the grid spans both.
DEFAULT_L2_GRID = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
SELECTIONS = ("global", "per_tag")
SMALL_PRODUCT_FLOPS = 20_000_000  # below this many multiply-adds per matrix product, BLAS runs on one thread
MAX_POS_WEIGHT = 100.0  # a tag with 1 positive in 10,000 rows would otherwise dominate its own loss 10,000:1


@dataclass(frozen=True)
class LinearHead:
    """A fitted head: ``scores = sigmoid(embeddings @ weight.T + bias)`` on raw embeddings."""

    weight: np.ndarray  # (tags, dim) float32
    bias: np.ndarray  # (tags,) float32
    l2: np.ndarray  # (tags,) the L2 strength each tag's weights were fitted with

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(embeddings, np.float32) @ self.weight.T + self.bias

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        return sigmoid(self.logits(embeddings))


@dataclass
class ProbeFit:
    """The chosen head and how it was chosen (validation macro mAP per grid value)."""

    head: LinearHead
    l2: float  # the globally chosen strength (per-tag choices are in ``head.l2``)
    grid: list[float]
    val_map: list[float] = field(default_factory=list)  # validation macro mAP per grid value, NaN without val rows
    iterations: list[int] = field(default_factory=list)  # L-BFGS iterations per grid value


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, overflow-free for large negative logits."""
    x = np.asarray(x)
    out = np.empty_like(x)
    positive = x >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
    e = np.exp(x[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def positive_weights(y: np.ndarray, balance: float) -> np.ndarray:
    """Per-tag weight of the positive term of the BCE: ``((N - P) / P) ** balance``, capped at
    ``MAX_POS_WEIGHT``; 1 everywhere for ``balance`` 0 (plain BCE), the inverse class ratio for 1."""
    y = np.asarray(y, np.float64)
    positives = y.sum(axis=0)
    ratio = np.where(positives > 0, (len(y) - positives) / np.maximum(positives, 1), 1.0)
    return np.minimum(np.power(np.maximum(ratio, 1e-12), balance), MAX_POS_WEIGHT)


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of the training rows; a constant feature keeps scale 1 (its
    standardised value is 0, so its weight stays 0 under L2)."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


def fit_logistic(
    z: np.ndarray,
    y: np.ndarray,
    l2: float | np.ndarray,
    pos_weight: np.ndarray | None = None,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = 500,
    tolerance: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimises, for every tag j at once, ``mean_i BCE(z_i . w_j + b_j, y_ij) + l2_j / 2 ||w_j||^2``
    (bias not penalised) by full-batch L-BFGS (scipy's L-BFGS-B, the solver behind scikit-learn's
    ``lbfgs``) from ``init`` or zero. ``z`` is (N, D) (standardise it first), ``y`` (N, T) 0/1.
    Returns (W (T, D), b (T,), iterations).

    ``tolerance`` bounds the largest gradient component of the mean loss at the end (scikit-learn
    stops at 1e-4; 1e-5 moves test AP by < 0.001 from 1e-6 on real photos, in half the iterations).

    A tag with no positive (or no negative) training row has no optimum (its bias runs off to
    infinity, and L-BFGS would spend every iteration chasing it): it gets ``w = 0`` and the bias
    of its smoothed training prevalence ``(P + 0.5) / (N + 1)``.

    numpy and scipy rather than ``torch.optim.LBFGS``: the gradient is two matrix products, and
    importing torch.optim pulls in torch._dynamo (seconds, per process) for no gain here."""
    y = np.asarray(y, np.float64)
    n, tags = y.shape
    positives = y.sum(axis=0)
    fit = (positives > 0) & (positives < n)
    prior = (positives + 0.5) / (n + 1.0)
    w = np.zeros((tags, z.shape[1]))
    b = np.log(prior / (1.0 - prior))
    if not fit.any():
        return w, b, 0
    l2s = np.broadcast_to(np.asarray(l2, np.float64), (tags,))[fit]
    sub_init = None if init is None else (np.asarray(init[0])[fit], np.asarray(init[1])[fit])
    sub_pw = None if pos_weight is None else np.asarray(pos_weight)[fit]
    w[fit], b[fit], iterations = _lbfgs(z, y[:, fit], l2s, sub_pw, sub_init, max_iter, tolerance)
    return w, b, iterations


def _lbfgs(
    z: np.ndarray,
    y: np.ndarray,
    l2: float | np.ndarray,
    pos_weight: np.ndarray | None = None,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = 500,
    tolerance: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``fit_logistic`` on tags that have both classes."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    z = np.ascontiguousarray(z, np.float64)
    y = np.asarray(y, np.float64)
    n, dim = z.shape
    tags = y.shape[1]
    l2s = np.broadcast_to(np.asarray(l2, np.float64), (tags,))[:, None]
    pw = np.ones(tags) if pos_weight is None else np.asarray(pos_weight, np.float64)
    y_pos = y * pw  # the weighted positive term; (1 - y) weighs the negative one

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: tags * dim].reshape(tags, dim), theta[tags * dim :]
        logits = z @ w.T + b
        # y p log(1 + e^-l) + (1 - y) log(1 + e^l), each term overflow-free
        loss = (y_pos * np.logaddexp(0.0, -logits) + (1.0 - y) * np.logaddexp(0.0, logits)).sum() / n
        loss += 0.5 * float((l2s * w * w).sum())
        d_logits = (sigmoid(logits) * (y_pos + 1.0 - y) - y_pos) / n
        grad_w = d_logits.T @ z + l2s * w
        return loss, np.concatenate([grad_w.ravel(), d_logits.sum(axis=0)])

    w0, b0 = init if init is not None else (np.zeros((tags, dim)), np.zeros(tags))
    theta0 = np.concatenate([np.asarray(w0, np.float64).ravel(), np.asarray(b0, np.float64)])
    # BLAS threads only pay off on large products; on small ones their start-up and barriers cost
    # more than the product (10x slower on a busy 2-core machine), so small fits run on one thread.
    threads = None if n * dim * tags >= SMALL_PRODUCT_FLOPS else 1
    with threadpool_limits(limits=threads, user_api="blas"):
        result = minimize(
            loss_and_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tolerance, "ftol": 1e-12}
        )
    return result.x[: tags * dim].reshape(tags, dim), result.x[tags * dim :], int(result.nit)


def fold_standardisation(w: np.ndarray, b: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights on standardised features -> the same function of raw features:
    ``((x - m) / s) @ w.T + b == x @ (w / s).T + (b - (w / s) @ m)``."""
    w_raw = w / scale[None, :]
    return w_raw, b - w_raw @ mean


def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    l2: float | np.ndarray = 0.01,
    balance: float = 0.0,
    max_iter: int = 500,
) -> LinearHead:
    """One head at a fixed L2 strength (a float, or one per tag), on raw embeddings."""
    mean, scale = standardisation(x_train)
    z = (np.asarray(x_train, np.float64) - mean) / scale
    pw = positive_weights(y_train, balance) if balance else None
    w, b, _ = fit_logistic(z, y_train, l2, pw, max_iter=max_iter)
    w_raw, b_raw = fold_standardisation(w, b, mean, scale)
    l2s = np.broadcast_to(np.asarray(l2, np.float64), (w.shape[0],)).copy()
    return LinearHead(w_raw.astype(np.float32), b_raw.astype(np.float32), l2s)


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    balance: float = 0.0,
    selection: str = "global",
    max_iter: int = 500,
    patience: int = 2,
) -> ProbeFit:
    """Fits the head at every L2 strength of ``grid`` (strongest first, each warm-started from the
    previous) and keeps the one with the best validation macro mAP (ties: the stronger).

    ``selection`` "per_tag" keeps, for each tag, the strength with its own best validation AP
    (the loss is separable, so this is exactly per-tag model selection); a tag with no validation
    positive takes the global choice. Per-tag choice is noisy where validation positives are few.
    Without validation rows the grid must hold one value.

    With ``global`` selection the walk down the grid stops once ``patience`` successive values
    score below the best so far (their val mAP and the rest are NaN): weaker regularisation costs
    the most L-BFGS iterations, and on real photos validation mAP falls steadily past its peak
    (ccp-fashion: the best of 10 values was the strongest; the full grid took 14x scikit-learn's time)."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of: {', '.join(SELECTIONS)}")
    grid = sorted({float(v) for v in grid}, reverse=True)
    if not grid or min(grid) < 0:
        raise ValueError("the L2 grid needs at least one value, none negative")
    has_val = x_val is not None and y_val is not None and len(x_val) > 0 and np.asarray(y_val).any()
    if len(grid) > 1 and not has_val:
        raise ValueError("choosing the L2 strength needs validation rows with at least one positive label (or a single L2 value)")
    y_train = np.asarray(y_train, np.float64)
    mean, scale = standardisation(x_train)
    z = (np.asarray(x_train, np.float64) - mean) / scale
    z_val = (np.asarray(x_val, np.float64) - mean) / scale if has_val else None
    pw = positive_weights(y_train, balance) if balance else None
    fits, val_map, iterations, per_tag_ap = [], [], [], []
    init, stopped = None, False
    for l2 in grid:
        if not stopped and selection == "global" and has_val and patience > 0 and len(val_map) > patience:
            stopped = max(val_map[-patience:]) < max(val_map)  # past the peak for `patience` values
        if stopped:
            val_map.append(float("nan"))
            iterations.append(0)
            fits.append(fits[-1])
            continue
        w, b, n_iter = fit_logistic(z, y_train, l2, pw, init=init, max_iter=max_iter)
        init = (w, b)
        fits.append((w, b))
        iterations.append(n_iter)
        if has_val:
            val_scores = z_val @ w.T + b  # AP depends on the ranking only: logits will do
            val_map.append(mean_average_precision(y_val, val_scores)["macro"])
            per_tag_ap.append(per_tag_average_precision(y_val, val_scores))
        else:
            val_map.append(float("nan"))
    best = int(np.nanargmax(val_map)) if has_val else 0  # argmax keeps the first (strongest) of equals
    choice = np.full(y_train.shape[1], best)
    if selection == "per_tag" and has_val:
        ap = np.stack(per_tag_ap)  # (grid, tags)
        defined = ~np.isnan(ap).all(axis=0)
        choice[defined] = np.nanargmax(ap[:, defined], axis=0)
    w = np.stack([fits[c][0][j] for j, c in enumerate(choice)])
    b = np.array([fits[c][1][j] for j, c in enumerate(choice)])
    w_raw, b_raw = fold_standardisation(w, b, mean, scale)
    head = LinearHead(w_raw.astype(np.float32), b_raw.astype(np.float32), np.array([grid[c] for c in choice]))
    return ProbeFit(head, grid[best], grid, val_map, iterations)
