"""Views of a measure report: a DataFrame, a text table, a figure, and the files in ``--out``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from latentdist._io import save_figure, save_json, save_text

PROXY_COLUMNS = ("lipschitz_lower", "lipschitz_upper", "jacobian_fro", "spectral_complexity")


def curve_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per capacity: distance mean and interval, floor, parameter count, proxies."""
    rows = []
    for e in report["curve"]:
        d = e["distance"]
        ci = d["ci"] or [None, None]
        row = {
            "capacity": e["capacity"],
            "params": e["params"],
            "distance": d["mean"],
            "ci_low": ci[0],
            "ci_high": ci[1],
            "floor": report["floor"]["mean"],
        }
        for fit, v in e.get("by_fit", {}).items():
            row[f"{fit}_fit"] = v["mean"]
        if e.get("chosen"):
            row["chosen"] = " ".join(e["chosen"])
        if e.get("undetermined"):
            row["undetermined"] = True
        row.update(
            {k: e.get("proxies", {}).get(k) for k in PROXY_COLUMNS if k in e.get("proxies", {})}
        )
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table for the terminal, with a header stating what was measured."""
    frame = curve_frame(report)
    shown = frame.drop(columns=["floor"]).rename(
        columns={
            "lipschitz_lower": "lip_lo",
            "lipschitz_upper": "lip_hi",
            "jacobian_fro": "jac_fro",
            "spectral_complexity": "spec_cx",
        }
    )
    if report["generator"] == "linear":
        shown["capacity"] = "linear"
    floor = report["floor"]
    fci = floor["ci"]
    crit = report["critical_capacity"]
    lines = [
        f"{report['metric']} distance, fit={report['fit']} ({report['fit_meaning']}), "
        f"generator={report['generator']}, n_eval={report['n_eval']}, seeds={len(report['seeds'])}",
        f"floor (two disjoint data samples of n_eval): {floor['mean']:.4g}"
        + (f"  95% CI [{fci[0]:.4g}, {fci[1]:.4g}]" if fci else ""),
        shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"),
        f"critical capacity (distance <= {crit['epsilon']:.4g}, {crit['epsilon_source']}): "
        f"{crit['capacity'] if crit['capacity'] is not None else 'none in the sweep'}"
        + _interval_text(crit.get("interval")),
        saturation_line(report),
    ]
    choice = report.get("generator_choice", "")
    if choice and not choice.endswith("given"):
        lines.insert(1, f"generator auto -> {choice}")
    if report.get("selection"):
        lines.append(
            "distance = the best held-out bound chosen on validation rows; *_fit columns = each "
            "fit's own generator; chosen = the winner per seed (fit@capacity)"
        )
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def plot_measure(report: dict[str, Any], path: str | Path | None = None):
    """Distance vs capacity with its 95 % band and the floor; one panel per proxy beside it."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = curve_frame(report)
    proxies = [k for k in PROXY_COLUMNS if k in frame]
    fig, axes = plt.subplots(
        1, 1 + len(proxies), figsize=(4.2 * (1 + len(proxies)), 3.6), squeeze=False
    )
    ax = axes[0, 0]
    linear = report["generator"] == "linear"
    x = [0] if linear else frame["capacity"]
    label = "best bound" if report.get("selection") else f"fit={report['fit']}"
    ax.plot(x, frame["distance"], "o-", label=f"{report['metric']} ({label})")
    for col in [c for c in frame if c.endswith("_fit")]:
        ax.plot(x, frame[col], ".:", lw=1, label=col.replace("_", " "))
    if frame["ci_low"].notna().all():
        ax.fill_between(x, frame["ci_low"], frame["ci_high"], alpha=0.25, label="95% CI")
    floor = report["floor"]
    ax.axhline(floor["mean"], color="k", ls="--", lw=1, label="floor")
    if floor["ci"]:
        ax.axhspan(*floor["ci"], color="k", alpha=0.08)
    if not linear:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("linear generator" if linear else f"capacity ({report['generator']} width)")
    ax.set_ylabel(f"{report['metric']} distance (held-out)")
    ax.set_title("latent–data distance D_c")
    ax.legend(fontsize=8)
    for ax, key in zip(axes[0, 1:], proxies, strict=True):
        ax.plot(x, frame[key], "s-", color="tab:orange")
        if not linear:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("capacity")
        ax.set_title(key)
    fig.tight_layout()
    if path is not None:
        save_figure(path, fig, dpi=120)
        plt.close(fig)
    return fig


def save_measure(report: dict[str, Any], out_dir: str | Path) -> None:
    """``measure.json``, ``curve.csv`` and ``curve.png`` in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    save_json(out / "measure.json", report)
    save_text(out / "curve.csv", curve_frame(report).to_csv(index=False))
    plot_measure(report, out / "curve.png")


def saturation_line(report: dict[str, Any]) -> str:
    """Where the curve flattens (``estimator.saturation``), and how the sweep was extended."""
    flat = report.get("saturation") or {}
    sweep = report.get("sweep") or {}
    added = sweep.get("added") or []
    extended = (
        f"sweep extended by {', '.join(map(str, added))} ({sweep['stopped']})"
        if added
        else f"sweep not extended ({sweep['stopped']})"
        if sweep
        else ""
    )
    if flat.get("capacity") is None:
        text = "the curve has not flattened within the sweep"
    else:
        ex = flat["excess"]
        text = (
            f"the curve flattens at capacity {flat['capacity']}"
            + _interval_text(flat.get("interval"))
            + f"; there distance - floor = {ex['mean']:.4g}"
            + (f" [{ex['ci'][0]:.4g}, {ex['ci'][1]:.4g}]" if ex["ci"] else "")
        )
    return text + (f"; {extended}" if extended else "")


def _interval_text(interval: list | None) -> str:
    """'; 95% bootstrap interval over seeds [2, 8]' (none: not reached within the sweep)."""
    if not interval:
        return ""
    lo, hi = ("none" if c is None else str(c) for c in interval)
    return f"; 95% bootstrap interval over seeds [{lo}, {hi}]"
