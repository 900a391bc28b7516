"""Figures of recorded runs (the ``plots`` extra: ``pip install "dynrank[plots]"``).

- :func:`plot_spectral_ratio` — λ per layer over epochs, log-scale y, switch
  epochs marked, one panel per run (paper Fig. 1 and Fig. 5).
- :func:`plot_training_curves` — logged scalars (accuracy, loss, …) of several
  runs over epochs, one panel per scalar, switch epochs marked (paper Fig. 3).

matplotlib is imported only when a function here is called.  Figures are
built as ``matplotlib.figure.Figure`` objects on an Agg canvas: pyplot, the
global backend and rcParams are left untouched.

Runs can be given as :class:`~dynrank.RankMonitor` objects (live or loaded)
or as paths to files written by :meth:`~dynrank.RankMonitor.save`.
"""

import math
import numbers
import os
from collections.abc import Mapping

from ._args import as_names

__all__ = ["plot_spectral_ratio", "plot_training_curves"]

_METRIC_LABELS = {
    "spectral_ratio": "λ = σmax / σmin",
    "restricted_spectral_ratio": "σ₁ / σ_k within the factor rank k",
    "effective_rank": "effective rank (σ > tol·σmax)",
    "entropy_rank": "entropy effective rank",
    "stable_rank": "stable rank ‖W‖²_F / σ²max",
}
_SWITCH_STYLE = {"inflate": dict(color="red", linestyle=":"), "deflate": dict(color="darkorange", linestyle="--"),
                 "inflate+deflate": dict(color="purple", linestyle="-."), "change": dict(color="gray", linestyle=":")}


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        import matplotlib
    except ImportError as exc:
        raise ImportError("dynrank's plots need matplotlib, an optional extra: pip install \"dynrank[plots]\" "
                          "(or pip install matplotlib)") from exc
    return matplotlib, Figure, FigureCanvasAgg


def _runs(runs):
    from .monitor import RankMonitor
    if isinstance(runs, (RankMonitor, str, os.PathLike)):
        runs = [runs]
    try:
        runs = list(runs)
    except TypeError:
        raise TypeError(f"runs must be a RankMonitor, a path to a saved run, or a list of them, got "
                        f"{type(runs).__name__}") from None
    out = []
    for run in runs:
        if isinstance(run, (str, os.PathLike)):
            run = RankMonitor.load(run)
        if not isinstance(run, RankMonitor):
            raise TypeError(f"runs must be RankMonitors or paths to saved runs, got {type(run).__name__}")
        out.append(run)
    if not out:
        raise ValueError("no runs to plot")
    return out


def _names(value, what):
    """``value`` as a list of names: one str, or an iterable of str."""
    return as_names(value, what, "a name (str) or a list of names")


def _new_figure(ncols, nrows=1, width=5.2, height=3.9):
    _, Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(width * ncols + 0.8, height * nrows + 0.5), layout="constrained")
    Canvas(fig)
    return fig


def _finish(fig, path, dpi):
    if path is not None:
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        # "tight": the image grows to hold a legend wider than the axes above it.
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


def _legend_below(ax, handles, labels):
    """The legend under the axes: two columns of short entries, one column once an entry is long."""
    ncol = 1 if max((len(label) for label in labels), default=0) > 48 else 2
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, frameon=False)


def _mark_switches(ax, run):
    """Vertical lines between the last epoch in the old form and the first in the new."""
    seen = set()
    for s in run.switches:
        style = _SWITCH_STYLE.get(s["kind"], _SWITCH_STYLE["change"])
        label = f"{s['kind']} before epoch {s['epoch']}"
        ax.axvline(s["epoch"] - 0.5, linewidth=1.3, label=None if label in seen else label, **style)
        seen.add(label)


def plot_spectral_ratio(runs, path=None, *, metric="spectral_ratio", layers=None, title=None, dpi=120):
    """λ per layer over epochs, one panel per run, switch epochs marked.

    Each layer is one line coloured by its depth (colour bar: input side →
    output side), on one scale for all panels: the layer index i of every run
    has the colour the bar gives i.  Values that are ``math.inf``
    (rank-deficient weights, e.g. every lowrank layer for λ) cannot sit on a
    log axis: they are drawn as triangles on a dotted "∞" line above the
    largest finite value, and the legend says so.  Vertical lines mark form
    switches at epoch − ½ (between the last epoch in the old form and the
    first in the new).

    Args:
        runs: a RankMonitor, a saved-run path, or a list of them.
        path: where to save (PNG by extension); None to only return the figure.
        metric: per-layer metric to plot (``"spectral_ratio"``, or e.g.
            ``"restricted_spectral_ratio"`` for low-rank training, where λ is ∞).
        layers: layer names to include, one str or a list (default: all measured).
        title: figure title (default names the metric).
        dpi: resolution of the saved image.

    Returns:
        ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib missing.  TypeError: ``layers`` not names.
        ValueError: nothing measured; an unknown or non-numeric ``metric``; a name in ``layers`` that
            no run measured (the message lists the measured ones).

    Example:
        >>> import torch
        >>> from dynrank import FusedLowRankLinear, RankMonitor
        >>> layer = FusedLowRankLinear(16, 16, rank=4)
        >>> run = RankMonitor(torch.nn.Sequential(layer), name="dynamic")
        >>> for epoch in range(3):
        ...     if epoch == 1:
        ...         _ = layer.inflate()                        # the monitor records the switch
        ...     with run.epoch(epoch):
        ...         pass                                       # train here
        ...     run.log(loss=1.0 / (epoch + 1))
        >>> fig = plot_spectral_ratio(run, "lambda.png")       # λ = ∞ in epoch 0, finite after
        >>> fig = plot_training_curves([run], "curves.png", keys=["loss"])
    """
    matplotlib, _, _ = _matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    runs = _runs(runs)
    series = [run.layer_series(metric) for run in runs]
    if layers is not None:
        layers = _names(layers, "layers")
        measured = []
        for s in series:
            measured += [n for n in s if n not in measured]
        unknown = [n for n in layers if n not in measured]
        if unknown:
            raise ValueError(f"no run measured layers {unknown} (measured: {measured})")
        series = [{n: s[n] for n in layers if n in s} for s in series]
    if not any(series):
        raise ValueError(f"no per-layer {metric!r} values recorded in these runs")
    wrong = next((v for s in series for _, vals in s.values() for v in vals
                  if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real))), None)
    if wrong is not None:
        raise ValueError(f"metric {metric!r} is not a number per layer (a value is {wrong!r}); plot one of "
                         f"the numeric metrics, e.g. 'spectral_ratio', 'effective_rank'")
    finite = [v for s in series for _, vals in s.values() for v in vals if v is not None and math.isfinite(v)
              and v > 0]
    top = max(finite) if finite else 10.0
    bottom = min(finite) if finite else 1.0
    ceiling = top * 3.0                  # the "∞" band: clearly above every finite value on a log axis
    has_inf = any(v is not None and math.isinf(v) for s in series for _, vals in s.values() for v in vals)
    cmap = matplotlib.colormaps["viridis"]

    # One colour scale for every panel, the colour bar's: layer index i has one colour in all runs.
    most = max(len(s) for s in series)
    norm = Normalize(0, max(1, most - 1))

    fig = _new_figure(len(runs))
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, run, s in zip(axes, runs, series):
        names = list(s)
        any_inf = False
        for i, name in enumerate(names):
            epochs, values = s[name]
            color = cmap(norm(i))
            shown = [v if v is not None and math.isfinite(v) else math.nan for v in values]
            ax.plot(epochs, shown, color=color, linewidth=1.2, marker="." if len(epochs) < 40 else None,
                    label=name if len(names) <= 10 else None)
            inf_epochs = [e for e, v in zip(epochs, values) if v is not None and math.isinf(v)]
            if inf_epochs:
                any_inf = True
                # Each layer gets its own height inside the ∞ band so coinciding markers stay visible.
                y = ceiling * 2.0 ** (i / max(1, len(names) - 1))
                ax.plot(inf_epochs, [y] * len(inf_epochs), linestyle="none", marker="^", markersize=5,
                        color=color, markeredgecolor="black", markeredgewidth=0.3)
        if any_inf:
            ax.axhspan(ceiling / 1.15, ceiling * 2.3, color="0.92", zorder=0)
            ax.text(1.0, ceiling * 1.4, " ∞", transform=ax.get_yaxis_transform(), va="center", ha="left",
                    fontsize=12)
        _mark_switches(ax, run)
        ax.set_yscale("log")
        ax.set_ylim(bottom / 1.5, ceiling * 2.6 if has_inf else top * 1.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(f"{run.name}", fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if any_inf:
            handles.append(Line2D([], [], linestyle="none", marker="^", color="gray", markeredgecolor="black"))
            labels.append("λ = ∞ (rank-deficient weight), drawn in the grey ∞ band")
        if handles:
            _legend_below(ax, handles, labels)
    if most > 10:                        # too many layers for a legend: one colour bar for all panels
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), pad=0.03,
                           fraction=0.03)
        bar.set_label("layer index (0 = input side)")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    axes[0].set_ylabel(f"{_METRIC_LABELS.get(metric, metric)} (log scale)")
    fig.suptitle(title or f"Per-layer singular-value {'spectral ratio' if 'ratio' in metric else metric} "
                          f"over training", fontsize=12)
    return _finish(fig, path, dpi)


def plot_training_curves(runs, path=None, *, keys=None, labels=None, title=None, mark_switches=True, dpi=120):
    """Logged scalars of several runs over epochs: one panel per scalar, one line per run.

    Args:
        runs: RankMonitors or saved-run paths (one line each, named by ``run.name``).
        path: where to save; None to only return the figure.
        keys: scalar names to plot, one str or a list (default: every scalar logged by any run).
        labels: optional dict scalar name → axis label (e.g. ``{"accuracy": "validation accuracy (%)"}``).
        title: figure title.
        mark_switches: draw each run's switch epochs in its colour (one line per epoch and kind; one
            that several runs share is drawn once, in black).
        dpi: resolution of the saved image.

    Returns:
        ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib missing.  TypeError: ``keys`` not names.
        ValueError: no scalars logged; an empty ``keys``, or a key no run logged (the message lists the
            logged ones).

    Example: see :func:`plot_spectral_ratio`.
    """
    matplotlib, _, _ = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    runs = _runs(runs)
    logged = []
    for run in runs:
        logged += [k for k in run.scalar_names() if k not in logged]
    keys = list(logged) if keys is None else _names(keys, "keys")
    if not keys:
        if logged:      # keys=[] given
            raise ValueError(f"keys is empty; give the scalars to plot (logged: {logged}), or None for all of them")
        raise ValueError("no logged scalars to plot; log some with monitor.log(loss=..., accuracy=...)")
    unknown = [k for k in keys if k not in logged]
    if unknown:
        raise ValueError(f"no run logged {unknown} (logged: {logged})")
    if labels is not None and not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a dict scalar name → axis label, got {type(labels).__name__}")
    labels = dict(labels or {})
    colors = matplotlib.colormaps["tab10"]
    fig = _new_figure(len(keys))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        shared = {}
        for i, run in enumerate(runs):
            epochs, values = run.scalar(key)
            if epochs:
                ax.plot(epochs, values, color=colors(i % 10), linewidth=1.4, label=run.name)
            for s in run.switches:
                who = shared.setdefault((s["epoch"], s["kind"]), [])
                if i not in who:        # two switches of one run in one epoch (rank growth) are one run's
                    who.append(i)
        if mark_switches:
            # One line per (epoch, kind): a switch several runs share is drawn once, in black.
            for (epoch, kind), who in sorted(shared.items()):
                style = dict(_SWITCH_STYLE.get(kind, _SWITCH_STYLE["change"]))
                style["color"] = colors(who[0] % 10) if len(who) == 1 else "black"
                names = ", ".join(runs[i].name for i in who)
                ax.axvline(epoch - 0.5, linewidth=1.2, label=f"{kind} before epoch {epoch} ({names})", **style)
        pretty = labels.get(key, key.replace("_", " "))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(pretty)
        ax.set_title(f"{pretty} per epoch", fontsize=11)
        ax.grid(True, alpha=0.3)
        _legend_below(ax, *ax.get_legend_handles_labels())
    fig.suptitle(title or "Training curves: " + ", ".join(run.name for run in runs)
                 + (" (vertical lines: rank switches)" if mark_switches and any(r.switches for r in runs) else ""),
                 fontsize=12)
    return _finish(fig, path, dpi)
