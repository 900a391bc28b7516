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
# The monitor's epochs count from 0, as scheduler.step(epoch) and the schedule's I and D do.
_EPOCH_LABEL = "epoch (from 0, as the schedule's I and D)"
_NOT_FINITE = dict(linestyle="none", marker="x", markersize=7, markeredgewidth=1.6, clip_on=False, zorder=5)
# The triangles of plot_spectral_ratio's ∞ and 0 bands (▲ and ▼), in the layer's colour.
_BAND_MARK = dict(linestyle="none", markersize=5, markeredgecolor="black", markeredgewidth=0.3)
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


def _points(count):
    """Line style of a series of ``count`` epochs: every epoch marked, so that one epoch, or a finite value
    between NaNs, shows; smaller marks on long runs."""
    return dict(marker=".", markersize=6 if count < 40 else 2.5)


def _mark_not_finite(ax, epochs, color):
    """× on the top edge of the axes at ``epochs``, those whose value has no place on the y axis (NaN, a
    scalar's ±∞).  Returns whether any was drawn."""
    if epochs:
        ax.plot(epochs, [1.0] * len(epochs), color=color, transform=ax.get_xaxis_transform(), **_NOT_FINITE)
    return bool(epochs)


def _legend_mark(marker, **style):
    """A legend entry's grey ``marker`` with no line, drawn only in the legend."""
    from matplotlib.lines import Line2D
    return Line2D([], [], linestyle="none", marker=marker, color="gray", **style)


def _not_finite_key():
    """The legend entry of :func:`_mark_not_finite`'s ×."""
    return _legend_mark(_NOT_FINITE["marker"], markeredgewidth=_NOT_FINITE["markeredgewidth"])


def _band(ax, low, high, at, text):
    """A grey band across the axes from ``low`` to ``high`` on the y axis, named ``text`` at height ``at``
    beside the axes' right edge."""
    ax.axhspan(low, high, color="0.92", zorder=0)
    ax.text(1.0, at, text, transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=12)


def _pin_epochs(ax, epochs, switch_epochs=()):
    """The x axis from the first recorded epoch to the last (the switch lines at epoch − ½ included), ½ beyond
    each end, integer ticks: one epoch, or values that are all NaN, still get an axis of epochs."""
    from matplotlib.ticker import MaxNLocator
    xs = list(epochs) + [e - 0.5 for e in switch_epochs]
    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))     # one epoch: one tick, not 0.1 steps
    ax.set_xlabel(_EPOCH_LABEL)


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
    log axis: they are drawn as triangles in a grey "∞" band above the
    largest finite value, and the legend says so; zeros (σmin of every
    lowrank layer) likewise in a grey "0" band below the smallest positive
    value, and NaN (a layer whose weights diverged) as × on the top edge.
    Every epoch is marked, so a run of one epoch shows.  Vertical lines mark
    form switches at epoch − ½ (between the last epoch in the old form and the
    first in the new); the x axis counts epochs from 0, as the schedule's I
    and D (the recorded epochs, ½ beyond each end).

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
    floor = bottom / 3.0                 # the "0" band: clearly below every positive value
    has_inf = any(v is not None and math.isinf(v) for s in series for _, vals in s.values() for v in vals)
    has_zero = any(v == 0 for s in series for _, vals in s.values() for v in vals)
    symbol = "λ" if metric == "spectral_ratio" else metric
    cmap = matplotlib.colormaps["viridis"]

    # One colour scale for every panel, the colour bar's: layer index i has one colour in all runs.
    most = max(len(s) for s in series)
    norm = Normalize(0, max(1, most - 1))

    fig = _new_figure(len(runs))
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, run, s in zip(axes, runs, series):
        names = list(s)
        any_inf = any_zero = any_nan = False
        for i, name in enumerate(names):
            epochs, values = s[name]
            color = cmap(norm(i))
            shown = [v if v is not None and math.isfinite(v) and v > 0 else math.nan for v in values]
            ax.plot(epochs, shown, color=color, linewidth=1.2, label=name if len(names) <= 10 else None,
                    **_points(len(epochs)))
            # Each layer gets its own height inside the ∞ and 0 bands so coinciding markers stay visible.
            step = 2.0 ** (i / max(1, len(names) - 1))
            inf_epochs = [e for e, v in zip(epochs, values) if v is not None and math.isinf(v)]
            if inf_epochs:
                any_inf = True
                ax.plot(inf_epochs, [ceiling * step] * len(inf_epochs), marker="^", color=color, **_BAND_MARK)
            zero_epochs = [e for e, v in zip(epochs, values) if v == 0]
            if zero_epochs:
                any_zero = True
                ax.plot(zero_epochs, [floor / step] * len(zero_epochs), marker="v", color=color, **_BAND_MARK)
            nan_epochs = [e for e, v in zip(epochs, values) if v is not None and math.isnan(v)]
            any_nan = _mark_not_finite(ax, nan_epochs, color) or any_nan
        if any_inf:
            _band(ax, ceiling / 1.15, ceiling * 2.3, ceiling * 1.4, " ∞")
        if any_zero:
            _band(ax, floor / 2.3, floor * 1.15, floor / 1.4, " 0")
        _mark_switches(ax, run)
        ax.set_yscale("log")
        ax.set_ylim(floor / 2.6 if has_zero else bottom / 1.5, ceiling * 2.6 if has_inf else top * 1.5)
        _pin_epochs(ax, run.epochs, [sw["epoch"] for sw in run.switches])
        ax.set_title(f"{run.name}", fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if any_inf:
            handles.append(_legend_mark("^", markeredgecolor="black"))
            labels.append("λ = ∞ (rank-deficient weight), drawn in the grey ∞ band")
        if any_zero:
            handles.append(_legend_mark("v", markeredgecolor="black"))
            labels.append(f"{symbol} = 0, drawn in the grey 0 band")
        if any_nan:
            handles.append(_not_finite_key())
            labels.append(f"{symbol} = NaN (non-finite weights), drawn as × on the top edge")
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

    Every epoch is marked, so a run of one epoch shows; a value that is NaN or ±∞ (a diverged run) is
    drawn as × on the top edge of its panel, in its run's colour.  The x axis counts epochs from 0, as
    the schedule's I and D (the recorded epochs of all runs, ½ beyond each end).

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
        any_bad = False
        for i, run in enumerate(runs):
            epochs, values = run.scalar(key)
            if epochs:
                shown = [v if math.isfinite(v) else math.nan for v in values]
                ax.plot(epochs, shown, color=colors(i % 10), linewidth=1.4, label=run.name, **_points(len(epochs)))
                bad_epochs = [e for e, v in zip(epochs, values) if not math.isfinite(v)]
                any_bad = _mark_not_finite(ax, bad_epochs, colors(i % 10)) or any_bad
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
        _pin_epochs(ax, [e for run in runs for e in run.epochs],
                    [epoch for epoch, _ in shared] if mark_switches else ())
        ax.set_ylabel(pretty)
        ax.set_title(f"{pretty} per epoch", fontsize=11)
        ax.grid(True, alpha=0.3)
        handles, legend = ax.get_legend_handles_labels()
        if any_bad:
            handles.append(_not_finite_key())
            legend.append("NaN or ±∞ (a diverged run), drawn as × on the top edge")
        _legend_below(ax, handles, legend)
    fig.suptitle(title or "Training curves: " + ", ".join(run.name for run in runs)
                 + (" (vertical lines: rank switches)" if mark_switches and any(r.switches for r in runs) else ""),
                 fontsize=12)
    return _finish(fig, path, dpi)
