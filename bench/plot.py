"""The figure of `python bench/run.py --plot PATH`: the measured rows as horizontal bars, one group
per case (shape, dtype, layout) and one bar per backend, in a row for the forward and a row for
forward+backward: the median time (log scale, the interquartile range as an error bar), the
speedup over unfold (a line at 1), and, where the run measured it (on a GPU), the percentage of the
memory roofline. Rows that were skipped or raised are left out.

matplotlib is optional (in the `train` extra); bench/run.py checks for it before it measures
anything. The figure uses matplotlib's object-oriented API, not pyplot.
"""

from __future__ import annotations

MATPLOTLIB_HINT = 'pip install matplotlib, or the train extra: pip install -e ".[train]"'

# (key of the measurement, panel title); the roofline panel only where some row has it
PANELS = (("ms", "median time, ms (log scale)"), ("speedup", "speedup over unfold"), ("roofline_pct", "% of roofline"))
PASSES = (("fwd", "forward"), ("fwdbwd", "forward + backward"))


def matplotlib_missing() -> str | None:
    """Why --plot cannot draw here (matplotlib not importable), or None."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); {MATPLOTLIB_HINT}"
    return None


def _case(row: dict) -> str:
    return f"{row['shape']} {row['dtype']} {row['layout']}"


def plot_results(rows: list[dict], meta: dict, path: str) -> list[str]:
    """Draw the timed ``rows`` of a run (its JSON's "results", with its "meta") to the image file
    ``path`` (its format from the extension, e.g. .png, .svg, .pdf); returns the panel titles."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    timed = [r for r in rows if "fwd_ms" in r]
    cases = list(dict.fromkeys(_case(r) for r in timed))
    backends = list(dict.fromkeys(r["backend"] for r in timed))
    panels = [(key, title) for key, title in PANELS if key != "roofline_pct" or any(f"fwd_{key}" in r for r in timed)]
    height = 1.4 + 0.22 * max(1, len(cases)) * max(2, len(backends))
    fig = Figure(figsize=(4.2 * len(panels) + 2.0, 2 * height), dpi=80, layout="constrained")
    axes = fig.subplots(len(PASSES), len(panels), squeeze=False, sharey=True)
    bar = 0.8 / max(1, len(backends))
    titles = []
    for (pass_key, pass_name), axes_row in zip(PASSES, axes):
        for (key, title), ax in zip(panels, axes_row):
            for j, backend in enumerate(backends):
                ys, values, errors = [], [], []
                for i, case in enumerate(cases):
                    row = next((r for r in timed if _case(r) == case and r["backend"] == backend), None)
                    value = None if row is None else row.get(f"{pass_key}_{key}")
                    if value is None:
                        continue
                    ys.append(i + (j - (len(backends) - 1) / 2) * bar)
                    values.append(value)
                    if key == "ms":  # the interquartile range
                        errors.append((value - row[f"{pass_key}_q1_ms"], row[f"{pass_key}_q3_ms"] - value))
                xerr = list(zip(*errors)) if errors else None
                ax.barh(ys, values, height=bar, xerr=xerr, color=f"C{j}", label=backend, capsize=2)
            if key == "ms":
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            elif key == "speedup":
                ax.axvline(1.0, color="k", linewidth=0.8)
            else:
                ax.axvline(100.0, color="k", linewidth=0.8, linestyle="--")
            ax.set_title(f"{pass_name}: {title}", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
            titles.append(ax.get_title())
        axes_row[0].set_yticks(range(len(cases)), cases, fontsize=8)
    axes[0][0].invert_yaxis()  # the first case on top (the y axis is shared)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(backends), 6), fontsize=9)
    fig.suptitle(f"{meta.get('device', '')}, torch {meta.get('torch', '?')}, {meta.get('date', '')}", fontsize=10)
    fig.savefig(path)
    return titles
