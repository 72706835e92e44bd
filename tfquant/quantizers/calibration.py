"""Choosing an initial clipping range from representative values."""

import numpy as np


def mse_optimal_clip(values: np.ndarray, levels: int, low: float = 0.0) -> float:
    """The clip value c in (low, max] minimizing the squared error of
    uniform quantization of `values` (non-negative magnitudes) onto `levels`
    steps over [low, c].

    A grid search over 64 candidates between 20% and 100% of the maximum,
    on a subsample of at most 100k values: cheap, deterministic, and far
    better than max() at 2..4 bits, where one outlier would waste the grid.
    """
    values = np.asarray(values, np.float64).ravel()
    top = float(values.max()) if values.size else 0.0
    if top <= low:
        return max(top, low) + 1e-3
    if values.size > 100_000:
        values = values[np.linspace(0, values.size - 1, 100_000).astype(np.int64)]
    best, best_err = top, np.inf
    for clip in np.linspace(low + 0.2 * (top - low), top, 64):
        step = (clip - low) / levels
        q = np.clip(np.round((values - low) / step), 0, levels) * step + low
        q = np.where(values < low, 0.0, q)
        err = float(np.mean((q - values) ** 2))
        if err < best_err:
            best, best_err = float(clip), err
    return best
