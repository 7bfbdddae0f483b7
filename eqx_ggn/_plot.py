"""Plots of curvature histories and spectral densities (needs matplotlib)."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Plotting needs matplotlib: pip install 'eqx_ggn[examples]'."
        ) from error
    return plt


def plot_curvature_history(
    history: Sequence[tuple[int, dict[str, float]]],
    *,
    learning_rate: float | None = None,
    path: str | Path | None = None,
) -> Any:
    """Plot `lambda_max` and the trace against the step, with the `2/lr` line.

    **Arguments:**

    - `history`: `(step, metrics)` pairs, as a [`eqx_ggn.CurvatureMonitor`][] sink
        that appends to a list receives them.
    - `learning_rate`: if given, draw the edge-of-stability line `2 / learning_rate`.
    - `path`: where to save the figure as PNG (optional).

    **Returns:**

    The matplotlib `Figure`.

    !!! example

        ```python
        import eqx_ggn

        history = [(0, {"lambda_max": 1.0, "trace": 5.0}),
                   (10, {"lambda_max": 3.0, "trace": 9.0})]
        fig = eqx_ggn.plot_curvature_history(history, learning_rate=0.5)
        ```
    """
    plt = _pyplot()
    steps = np.array([s for s, _ in history])
    fig, (ax_max, ax_trace) = plt.subplots(1, 2, figsize=(10, 4))
    ax_max.semilogy(steps, [m["lambda_max"] for _, m in history], "o-", label="λ_max")
    if learning_rate is not None:
        ax_max.axhline(2 / learning_rate, color="k", ls="--", label="2 / lr")
    ax_max.set(xlabel="step", ylabel="largest eigenvalue", title="sharpness")
    ax_max.legend()
    ax_trace.semilogy(steps, [m["trace"] for _, m in history], "o-", color="C1")
    ax_trace.set(xlabel="step", ylabel="trace", title="trace (Hutchinson)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_spectral_density(
    grid: Any, density: Any, *, path: str | Path | None = None, title: str = ""
) -> Any:
    """Plot a spectral density from [`eqx_ggn.spectral_density`][] (log scale).

    **Arguments:**

    - `grid`, `density`: the two arrays returned by `spectral_density`.
    - `path`: where to save the figure as PNG (optional).
    - `title`: the axes' title.

    **Returns:**

    The matplotlib `Figure`.

    !!! example

        ```python
        import numpy as np
        import eqx_ggn

        grid = np.linspace(-1, 1, 50)
        fig = eqx_ggn.plot_spectral_density(grid, np.exp(-grid**2))
        ```
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.semilogy(np.asarray(grid), np.maximum(np.asarray(density), 1e-12))
    ax.set(xlabel="eigenvalue", ylabel="density", title=title or "spectral density")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
