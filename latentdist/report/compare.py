"""Views of a compare report: a DataFrame, text and Markdown tables, figures, and the files in --out.

Every interval is a 95 % Student-t interval over seeds (generation, distance) or samples
(reconstruction MSE), printed as ``mean ± half-width``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from latentdist._io import save_figure, save_json, save_text
from latentdist.report.measure import PROXY_COLUMNS

GEN_COLUMNS = (
    ("fd", "FD"),
    ("kid", "KID"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("density", "density"),
    ("coverage", "coverage"),
    ("w2", "W2"),
)


HEADLINE_GEN = tuple(c for c in GEN_COLUMNS if c[0] != "kid")  # KID: probe table, JSON, frame


def _half(ci: list[float] | None) -> float | None:
    return None if not ci else (ci[1] - ci[0]) / 2


def _pm(mean: float | None, ci: list[float] | None, fmt: str = "{:.4g}") -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    h = _half(ci)
    return fmt.format(mean) + ("" if h is None else f" ± {h:.2g}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def _cap_label(cap: int | None) -> str:
    return "D (linear)" if cap is None else f"D_c c={cap}"


def compare_frame(report: dict[str, Any]) -> pd.DataFrame:
    """One row per run with numeric columns (means, and ``*_lo``/``*_hi`` interval ends)."""
    rows = []
    for r in report["runs"]:
        rec, m, g = r["reconstruction"], r["measure"], r["generation"]
        row: dict[str, Any] = {
            "run": r["name"],
            "mode": r["mode"],
            "encoder_params": r["encoder_params"],
            "decoder_params": r["decoder_params"],
            "recon_mse": rec["mse"],
            "psnr": rec["psnr"],
        }
        for e in m["curve"]:
            label = _cap_label(e["capacity"])
            row[label] = e["distance"]["mean"]
            ci = e["distance"]["ci"] or [None, None]
            row[f"{label}_lo"], row[f"{label}_hi"] = ci
        row["floor"] = m["floor"]["mean"]
        row["critical_capacity"] = m["critical_capacity"]["capacity"]
        row["saturation_capacity"] = (m.get("saturation") or {}).get("capacity")
        for key, _ in GEN_COLUMNS:
            row[key] = g[key]["mean"]
            ci = g[key]["ci"] or [None, None]
            row[f"{key}_lo"], row[f"{key}_hi"] = ci
        for key, _ in GEN_COLUMNS:
            p = (r.get("probe") or {}).get(key)
            row[f"probe_{key}"] = p["mean"] if p else None
            row[f"probe_{key}_lo"], row[f"probe_{key}_hi"] = (p and p["ci"]) or [None, None]
        row.update(diagnostic_values(r.get("diagnostics") or {}))
        row.update(signal_values(r.get("signals") or {}))
        rows.append(row)
    return pd.DataFrame(rows)


def _value(d: Any, *keys: str) -> float | None:
    """d[k1][k2]... as a float, or None where a key is missing or the entry was skipped."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, (int, float)) and d is not None else None


def diagnostic_values(diag: dict[str, Any]) -> dict[str, float | None]:
    """The scalar diagnostics of one run (None where skipped), keyed as in tables and studies."""
    out = {
        "spectrum_kl": _value(diag, "spectrum", "kl_image_latent"),
        "spectrum_hf_latent": _value(diag, "spectrum", "high_freq_fraction", "latent"),
        "equivariance_scale": _value(diag, "equivariance", "scale_2x"),
        "equivariance_rot90": _value(diag, "equivariance", "rot90"),
        "scaling_factor": _value(diag, "statistics", "scaling_factor"),
        "std_spread": _value(diag, "statistics", "std_spread"),
        "gaussian_kl_per_dim": _value(diag, "statistics", "gaussian_kl", "kl_per_dim"),
        "gmm_modes": _value(diag, "modes", "n_modes"),
    }
    for sigma, v in ((diag.get("decoder_robustness") or {}).get("mse") or {}).items():
        out[f"noisy_mse_{sigma}"] = float(v)
    return out


def signal_values(sig: dict[str, Any]) -> dict[str, float | None]:
    """The scalar cheap signals of one run (None where skipped), keyed as in tables and studies:
    interpolation FD (linear, slerp) and perturbation FD with their floor and the FD of the same
    rows reconstructed, the velocity irreducible variance, the linear-probe accuracy and chance."""
    return {
        "ifid_linear": _value(sig, "interpolation", "linear"),
        "ifid_slerp": _value(sig, "interpolation", "slerp"),
        "ifid_recon": _value(sig, "interpolation", "reconstruction"),
        "ifid_floor": _value(sig, "interpolation", "floor"),
        "pfid": _value(sig, "perturbation", "fd"),
        "pfid_recon": _value(sig, "perturbation", "reconstruction"),
        "pfid_floor": _value(sig, "perturbation", "floor"),
        "viv": _value(sig, "velocity_variance", "viv"),
        "linear_probe_acc": _value(sig, "linear_probe", "accuracy"),
        "linear_probe_chance": _value(sig, "linear_probe", "chance"),
    }


SIGNAL_COLUMNS = (
    ("ifid_linear", "interp FD (linear)"),
    ("ifid_slerp", "interp FD (slerp)"),
    ("pfid", "perturb FD"),
    ("recon", "recon FD (same rows)"),
    ("floor", "floor"),
    ("viv", "velocity var."),
    ("linear_probe_acc", "linear probe acc."),
)


def _signal_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of the signals table; None when no run has signals."""
    runs = [r for r in report["runs"] if r.get("signals")]
    if not runs:
        return None
    body = []
    for r in runs:
        v = signal_values(r["signals"])
        vq = v["pfid"] is not None
        v["recon"] = v["pfid_recon"] if vq else v["ifid_recon"]
        v["floor"] = v["pfid_floor"] if vq else v["ifid_floor"]
        cells = [_num(v[key]) for key, _ in SIGNAL_COLUMNS]
        viv_ci = (r["signals"].get("velocity_variance") or {}).get("ci")
        if v["viv"] is not None:
            cells[5] = _pm(v["viv"], viv_ci, "{:.3g}")
        if v["linear_probe_acc"] is not None:
            probe = r["signals"]["linear_probe"]
            cells[6] = _pm(v["linear_probe_acc"], probe["ci"], "{:.3f}")
            cells[6] += f" (chance {v['linear_probe_chance']:.2f})"
        body.append([r["name"], *cells])
    return ["run"] + [label for _, label in SIGNAL_COLUMNS], body


def signals_table(report: dict[str, Any]) -> str:
    """Markdown: the cheap signals per run ('' when no run has them)."""
    rows = _signal_rows(report)
    return _md(*rows) if rows else ""


def _table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    runs = report["runs"]
    # default sweeps extend as far as each run's curve needs: every capacity any run measured
    caps = sorted(
        {e["capacity"] for r in runs for e in r["measure"]["curve"]},
        key=lambda c: -1 if c is None else c,
    )
    metric = runs[0]["measure"]["metric"] if runs else "d"
    header = ["run", "mode", "enc/dec params", "recon MSE", "PSNR (dB)"]
    header += [f"{metric} c={c}" if c is not None else f"{metric} (linear)" for c in caps]
    header += ["floor", "critical c", "flattens at c"] + [label for _, label in HEADLINE_GEN]
    probe = any(r.get("probe") for r in runs)
    if probe:
        header += ["probe FD"]
    body = []
    for r in runs:
        rec, m, g = r["reconstruction"], r["measure"], r["generation"]
        by_cap = {e["capacity"]: e["distance"] for e in m["curve"]}
        crit = _critical_text(m["critical_capacity"])
        row = [
            r["name"],
            r["mode"],
            f"{r['encoder_params']:,} / {r['decoder_params']:,}",
            _pm(rec["mse"], rec["mse_ci"]),
            _pm(rec["psnr"], rec["psnr_ci"], "{:.2f}"),
        ]
        row += [_pm(by_cap[c]["mean"], by_cap[c]["ci"]) if c in by_cap else "-" for c in caps]
        row += [
            _pm(m["floor"]["mean"], m["floor"]["ci"]),
            crit,
            _critical_text(m["saturation"]) if m.get("saturation") else "-",
        ]
        row += [_pm(g[key]["mean"], g[key]["ci"], "{:.3g}") for key, _ in HEADLINE_GEN]
        if probe:
            p = r.get("probe") or {}
            row.append(_pm(p["fd"]["mean"], p["fd"]["ci"], "{:.3g}") if p else "-")
        body.append(row)
    return header, body


def _cap_text(cap: Any) -> str:
    return "none" if cap is None else str(cap)


def _critical_text(c: dict[str, Any]) -> str:
    """'4 [2, 8]': the critical capacity and its bootstrap interval over seeds ('none' when no
    capacity of the sweep reaches the floor)."""
    interval = c.get("interval")
    text = _cap_text(c.get("capacity"))
    if interval:
        text += f" [{_cap_text(interval[0])}, {_cap_text(interval[1])}]"
    return text


def _flattening_text(a: str, b: str, runs: dict, v: dict) -> str:
    """Where each run's curve flattens (saturation capacity with its interval, and how far
    above the floor it stays), and whether the paired bootstrap orders them."""
    parts = []
    for name in (a, b):
        flat = runs[name].get("saturation") or {}
        text = f"{name} {_critical_text(flat)}" if flat else f"{name} -"
        if flat.get("excess"):
            ex = flat["excess"]
            text += f" at {ex['mean']:.3g} above the floor"
        parts.append(text)
    first = v.get("flattens_first")
    tail = (
        f"{first} flattens at the smaller capacity"
        if first
        else "the bootstrap does not order where they flatten"
    )
    return f"Curves flatten ('none': still falling at the sweep's end): {'; '.join(parts)}; {tail}."


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """A few lines per pair of runs: which needs the smaller generator, the paired difference
    that says so, and whether the data can tell at all."""
    out = []
    runs = {r["name"]: r["measure"] for r in report["runs"]}
    for d in report.get("difference", []):
        a, b, v = d["a"], d["b"], d["verdict"]
        crit = " vs ".join(
            f"{name} {_critical_text(runs[name]['critical_capacity'])}" for name in (a, b)
        )
        sweep = ", ".join(_cap_text(e["capacity"]) for e in d["curve"])
        if v["smaller_generator"]:
            head = f"{v['smaller_generator']} needs the smaller generator"
        else:
            head = "the critical capacities cannot tell which needs the smaller generator"
        out.append(f"{a} vs {b}: {head} (critical capacity {crit}; sweep {sweep}).")
        out.append("  " + _flattening_text(a, b, runs, v))
        sep = v["separated_capacities"]
        if sep:
            e = next(e for e in d["curve"] if e["capacity"] == sep[0])
            out.append(
                f"  Paired D_c({a}) - D_c({b}), same rows and seeds: {v['closer_to_data']} is "
                f"closer to the data at c = {', '.join(map(_cap_text, sep))}; at c = "
                f"{_cap_text(sep[0])}: {e['mean']:.3g} [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}]."
            )
        else:
            out.append(
                f"  Paired D_c({a}) - D_c({b}): the 95% interval includes 0 at every capacity."
            )
        out.append(
            "  The data can tell them apart."
            if v["can_tell"]
            else "  The data cannot tell them apart at this sample size."
        )
    return out


def difference_table(report: dict[str, Any]) -> str:
    """Per pair of runs and capacity: the paired difference with its interval and seeds."""
    header = ["a - b", "capacity", "difference", "95% CI", "per seed"]
    body = []
    for d in report.get("difference", []):
        for e in d["curve"]:
            ci = e["ci"]
            body.append(
                [
                    f"{d['a']} - {d['b']}",
                    _cap_text(e["capacity"]),
                    f"{e['mean']:.4g}",
                    f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "-",
                    ", ".join(f"{v:.3g}" for v in e["per_seed"]),
                ]
            )
    return _md(header, body) if body else ""


def _md(header: list[str], body: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return "\n".join(out + ["| " + " | ".join(row) + " |" for row in body])


def probe_table(report: dict[str, Any]) -> str:
    """Markdown: the probe's metrics per run (mean ± 95% CI half-width over seeds) and its time."""
    header = ["run", "model"] + [f"probe {label}" for _, label in GEN_COLUMNS] + ["time (s)"]
    body = []
    for r in report["runs"]:
        p = r.get("probe")
        if not p:
            body.append([r["name"], "off"] + ["-"] * (len(GEN_COLUMNS) + 1))
            continue
        body.append(
            [r["name"], p["model"]]
            + [_pm(p[key]["mean"], p[key]["ci"], "{:.3g}") for key, _ in GEN_COLUMNS]
            + [f"{p['time_s']:.1f}"]
        )
    return _md(header, body)


def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    return "-" if v is None or not np.isfinite(v) else fmt.format(v)


def diagnostics_table(report: dict[str, Any]) -> str:
    """Markdown: spectrum, equivariance, statistics, modes and decoder robustness per run."""
    sigmas = []
    for r in report["runs"]:
        mse = ((r.get("diagnostics") or {}).get("decoder_robustness") or {}).get("mse") or {}
        sigmas = [k for k in mse if k not in sigmas and k != "0"] or sigmas
    header = [
        "run",
        "spectrum KL(img‖lat)",
        "latent HF share",
        "equiv. scale 2x",
        "equiv. rot 90°",
        "scaling factor",
        "channel std max/min",
        "Gaussian KL / dim",
        "GMM modes (BIC)",
    ] + [f"MSE σ={s_}" for s_ in sigmas]
    body = []
    for r in report["runs"]:
        v = diagnostic_values(r.get("diagnostics") or {})
        body.append(
            [
                r["name"],
                _num(v["spectrum_kl"]),
                _num(v["spectrum_hf_latent"]),
                _num(v["equivariance_scale"]),
                _num(v["equivariance_rot90"]),
                _num(v["scaling_factor"]),
                _num(v["std_spread"]),
                _num(v["gaussian_kl_per_dim"]),
                _num(v["gmm_modes"], "{:.0f}")
                + (
                    "+"
                    if ((r.get("diagnostics") or {}).get("modes") or {}).get("saturated")
                    else ""
                ),
            ]
            + [_num(v.get(f"noisy_mse_{s_}")) for s_ in sigmas]
        )
    return _md(header, body)


def _skipped_notes(report: dict[str, Any]) -> list[str]:
    """One line per diagnostic that was skipped, with its reason (deduplicated across runs)."""
    notes: dict[str, list[str]] = {}
    for r in report["runs"]:
        diag = r.get("diagnostics") or {}
        for key, val in diag.items():
            entries = val.items() if key == "equivariance" else [(key, val)]
            for name, v in entries:
                if isinstance(v, dict) and "skipped" in v:
                    notes.setdefault(f"{name}: {v['skipped']}", []).append(r["name"])
    return [f"- {note} ({', '.join(runs)})" for note, runs in notes.items()]


def _aligned(header: list[str], body: list[list[str]]) -> list[str]:
    """Lines of a plain-text table, columns right-aligned."""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return [line(header), *(line(b) for b in body)]


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table (runs as rows), preceded by what was measured and followed by the
    cheap signals."""
    cfg = report["measure_config"]
    signals = _signal_rows(report)
    return "\n".join(
        [
            *verdict_lines(report),
            _settings_line(report, cfg),
            *_aligned(*_table_rows(report)),
            *(["signals (docs/proxies.md):", *_aligned(*signals)] if signals else []),
            *(f"warning: {w}" for w in report.get("warnings", [])),
        ]
    )


def _settings_line(report: dict[str, Any], cfg: dict[str, Any]) -> str:
    gs = report["generation_settings"]
    return (
        f"data {report['data']['name']} {report['data']['shape']}; distance: {cfg['metric']}, "
        f"fit={cfg['fit']}, generator={cfg['generator']}, seeds={cfg['seeds']}; generation: "
        f"{len(gs['seeds'])} seeds vs held-out data, features={gs['features']['kind']}; "
        "± = 95% CI half-width"
    )


def markdown_table(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table a paper could print."""
    return _md(*_table_rows(report))


def _plt(path_given: bool):
    import matplotlib

    if path_given:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(report: dict[str, Any], path: str | Path | None = None):
    """Every run's distance curve with its 95 % band; each run's floor as a dashed line with
    its 95 % band (grey), so a curve inside the band reads as indistinguishable from data. The
    y axis is linear within the floor's band and logarithmic above it, so the curve can be read
    over its whole range. Beside it, for two or more runs, the paired difference of each pair
    per capacity with its 95 % interval (the question a comparison asks)."""
    plt = _plt(path is not None)
    pairs = report.get("difference") or []
    fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(11 if pairs else 6, 4), squeeze=False)
    ax = axes[0][0]
    linear, band = False, 0.0
    for i, r in enumerate(report["runs"]):
        m, color = r["measure"], f"C{i}"
        caps = [e["capacity"] for e in m["curve"]]
        linear = caps == [None]
        x = [0] if linear else caps
        mean = [e["distance"]["mean"] for e in m["curve"]]
        ax.plot(x, mean, "o-", color=color, label=f"{r['name']} ({r['mode']})")
        cis = [e["distance"]["ci"] for e in m["curve"]]
        if all(cis):
            ax.fill_between(x, [c[0] for c in cis], [c[1] for c in cis], color=color, alpha=0.2)
        ax.axhline(m["floor"]["mean"], color=color, ls="--", lw=1)
        if m["floor"]["ci"]:
            ax.axhspan(*m["floor"]["ci"], color="k", alpha=0.08)
            band = max(band, abs(m["floor"]["ci"][0]), abs(m["floor"]["ci"][1]))
    ax.plot([], [], "k--", lw=1, label="floor (data vs data) and its 95% CI")
    cfg = report["measure_config"]
    if not linear:
        ax.set_xscale("log", base=2)
    if band > 0:
        ax.set_yscale("symlog", linthresh=band)
    ax.set_xlabel(f"capacity ({cfg['generator']} width)")
    ax.set_ylabel(f"{cfg['metric']} distance (held-out)")
    ax.set_title(f"latent–data distance D_c (fit={cfg['fit']}, 95% CI)")
    ax.legend(fontsize=8)
    if pairs:
        _plot_differences(axes[0][1], pairs, linear)
    fig.tight_layout()
    if path is not None:
        save_figure(path, fig, dpi=120)
        plt.close(fig)
    return fig


def _plot_differences(ax: Any, pairs: list[dict], linear: bool) -> None:
    """D_c(a) - D_c(b) per capacity with its paired 95 % interval, one line per pair."""
    for k, d in enumerate(pairs):
        caps = [e["capacity"] for e in d["curve"]]
        x = [0] if linear else caps
        ax.plot(
            x,
            [e["mean"] for e in d["curve"]],
            "s-",
            color=f"C{k + 2}",
            label=f"{d['a']} - {d['b']}",
        )
        cis = [e["ci"] for e in d["curve"]]
        if all(cis):
            ax.fill_between(
                x, [c[0] for c in cis], [c[1] for c in cis], color=f"C{k + 2}", alpha=0.2
            )
    ax.axhline(0.0, color="k", lw=1)
    if not linear:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("capacity")
    ax.set_ylabel("paired difference (same rows and seeds)")
    ax.set_title("D_c(a) - D_c(b), 95% CI (below 0: a is closer)")
    ax.legend(fontsize=8)


def plot_proxies(report: dict[str, Any], path: str | Path | None = None):
    """One panel per generator-complexity proxy against capacity, runs overlaid."""
    plt = _plt(path is not None)
    keys = [
        k
        for k in PROXY_COLUMNS
        if all(k in e.get("proxies", {}) for r in report["runs"] for e in r["measure"]["curve"])
    ] or ["params"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for i, r in enumerate(report["runs"]):
            curve = r["measure"]["curve"]
            x = [e["capacity"] or 0 for e in curve]
            y = [e["proxies"].get(key, e.get(key)) for e in curve]
            ax.plot(x, y, "s-", color=f"C{i}", label=r["name"])
        if len(x) > 1:
            ax.set_xscale("log", base=2)
        if all(v is not None and v > 0 for v in y):
            ax.set_yscale("log")
        ax.set_xlabel("capacity")
        ax.set_title(key)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        save_figure(path, fig, dpi=120)
        plt.close(fig)
    return fig


def plot_spectra(report: dict[str, Any], path: str | Path | None = None):
    """Each run's radial DCT spectrum of the latent beside the downsampled images' (dashed)."""
    plt = _plt(path is not None)
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for i, r in enumerate(report["runs"]):
        spec = (r.get("diagnostics") or {}).get("spectrum") or {}
        if "latent" not in spec:
            continue
        lat = np.asarray(spec["latent"], dtype=float)
        img = np.asarray(spec["image"], dtype=float)
        bins = np.arange(len(lat))
        ok = np.isfinite(lat) & np.isfinite(img)
        kl = spec["kl_image_latent"]
        ax.plot(bins[ok], lat[ok], "o-", color=f"C{i}", label=f"{r['name']} latent (KL {kl:.3g})")
        ax.plot(bins[ok], img[ok], "--", color=f"C{i}", lw=1, alpha=0.7)
        drawn = True
    if drawn:
        ax.plot([], [], "k--", lw=1, label="images at the latent's size")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no spatial latents: no spectrum", ha="center", transform=ax.transAxes)
    ax.set_xlabel("radial DCT frequency bin (low → high)")
    ax.set_ylabel("normalised mean power")
    ax.set_title("latent vs image spectrum (Skorokhodov et al. 2025)")
    fig.tight_layout()
    if path is not None:
        save_figure(path, fig, dpi=120)
        plt.close(fig)
    return fig


def _to_display(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(C, H, W) in [lo, hi] -> (H, W) or (H, W, 3) in [0, 1] for imshow."""
    x = np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)
    return x.transpose(1, 2, 0) if x.shape[0] == 3 else x[0]


def plot_image_grid(
    rows: list[tuple[str, Any]], lo: float, hi: float, path: str | Path | None = None
):
    """A grid of images: one labelled row per (label, (N, C, H, W) tensor) pair."""
    plt = _plt(path is not None)
    ncol = max(len(t) for _, t in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.1 * ncol, 1.2 * len(rows)), squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        arr = np.asarray(imgs)
        for j in range(ncol):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(arr):
                ax.imshow(_to_display(arr[j], lo, hi), cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    if path is not None:
        save_figure(path, fig, dpi=100)
        plt.close(fig)
    return fig


def report_markdown(report: dict[str, Any], figures: dict[str, list[str]]) -> str:
    """report.md: settings, the table, definitions, warnings and the figures (relative links)."""
    d, cfg, gs = report["data"], report["measure_config"], report["generation_settings"]
    feat = gs["features"]
    feat_text = (
        f"the user's extractor `{feat['path']}`"
        if feat["kind"] == "user"
        else f"a small network trained here for {feat['steps']} steps on {feat['train_rows']} "
        f"training rows (seed {feat['seed']})"
        + (f": {feat['description']}" if feat.get("description") else "")
    )
    lines = [
        "# latentdist compare",
        "",
        f"Data: `{d['name']}`, {d['rows']} rows of shape {d['shape']} (fingerprint "
        f"`{d['fingerprint']}`). Created {report['created']} on {report['device']}.",
        "",
        *(["## Verdict", "", *verdict_lines(report), ""] if report.get("difference") else []),
        markdown_table(report),
        "",
        *(
            [
                "Paired differences: every run is scored on the same held-out rows, seeds and "
                "judges, so D_c(a) - D_c(b) is taken seed by seed; its interval carries only "
                "what differs between the runs. Critical capacity: mean ± bootstrap interval "
                "over seeds [lo, hi] ('none': not reached within the sweep).",
                "",
                difference_table(report),
                "",
            ]
            if report.get("difference")
            else []
        ),
        "Entries are mean ± 95% CI half-width. "
        f"Distance: {cfg['metric']}, fit={cfg['fit']}, generator={cfg['generator']} "
        f"(depth {cfg['depth']}), {cfg['steps']} steps, {cfg['seeds']} seeds, held-out distance vs "
        "the floor (the same discrepancy between two disjoint data samples); critical c is the "
        "smallest capacity whose distance is within the floor's upper limit.",
        "",
        f"Reconstruction on each run's held-out rows: {report['runs'][0]['reconstruction']['definition']} "
        f"(R = {d['range']:.4g}); interval over samples.",
        "",
        f"Generation: prior = {gs['prior']['continuous']}; VQ: {gs['prior']['vq']}. "
        f"{len(gs['seeds'])} seeds (prior fit, sampling), samples decoded by each run's decoder and "
        f"compared with held-out data. FD and precision/recall/density/coverage (k={gs['k']}) in "
        f"the feature space of {feat_text}; W2 in data space.",
        "",
        "| run | mode | held-out rows | from | params (enc / dec / aux dec) |",
        "|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        aux = r["aux_decoder_params"]
        lines.append(
            f"| {r['name']} | {r['mode']} | {r['held_out']['rows']} | {r['held_out']['source']} | "
            f"{r['encoder_params']:,} / {r['decoder_params']:,} / {'-' if aux is None else f'{aux:,}'} |"
        )
    ps = report.get("probe_settings")
    if ps:
        lines += [
            "",
            "## Generation probe",
            "",
            f"Continuous latents: {ps['continuous']}. VQ codes: {ps['vq']}. Trained on each run's "
            f"training-row latents, {len(ps['seeds'])} seeds, scored like the baseline above "
            "(same features, held-out rows, sample count). Mean ± 95% CI half-width.",
            "",
            probe_table(report),
        ]
    if any(r.get("diagnostics") for r in report["runs"]):
        lines += [
            "",
            "## Diagnostics",
            "",
            "Spectrum: KL(image ‖ latent) between 16-bin radial DCT power spectra of the latent and "
            "of the images blurred and resized to the latent's size, and the latent's share of "
            "power in the upper half of the bins (Skorokhodov et al. 2025). Equivariance: "
            "‖E(Tx) − T E(x)‖² / ‖E(Tx)‖² for 2x downscaling and 90° rotation (EQ-VAE). Scaling "
            "factor 1/std(z) as a diffusion model applies it; Gaussian KL per dimension of the "
            "per-channel standardised latent to N(0, I); GMM modes by BIC on the PCA-reduced "
            "latent (MAETok). MSE σ: reconstruction error of held-out rows with noise of std σ "
            "added to the standardised latent (l-DeTok). See docs/proxies.md.",
            "",
            diagnostics_table(report),
        ]
        notes = _skipped_notes(report)
        if notes:
            lines += ["", "Skipped:", ""] + notes
    if signals_table(report):
        lines += ["", "## Signals", "", SIGNALS_TEXT, "", signals_table(report)]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    lines += ["", "## Figures", ""]
    for title, files in figures.items():
        lines += [f"### {title}", ""] + [f"![{f}]({f})" for f in files] + [""]
    return "\n".join(lines)


SIGNALS_TEXT = (
    "Cheap predictors of generation (docs/proxies.md). Interpolation FD (continuous latents; "
    "iFID, arXiv 2603.05630): the held-out rows' latents mixed at 0.5 with one of their 10 "
    "nearest latents among the training rows (linear, or slerp), decoded and scored against as "
    "many other training rows in the FD feature space. Perturbation FD (VQ codes; pFID, arXiv 2509.12474): "
    "10% of tokens swapped for one of the 8 nearest codebook vectors, decoded, scored alike. "
    "Recon FD: the same rows decoded unchanged; floor: the same rows' data. Velocity var.: the "
    "share of the flow-matching target's variance no velocity net can explain (VIV, arXiv "
    "2606.03578), exact posterior over 1000 standardised latent rows, 16 times; ± over rows. "
    "Linear probe: logistic regression on the latent, held-out accuracy over 5 splits."
)


def save_compare(
    report: dict[str, Any], images: dict[str, dict[str, Any]], out_dir: str | Path
) -> list[Path]:
    """Write compare.json, curves.png, proxies.png, spectrum.png (spatial latents),
    recon_/samples_/probe_<run>.png (images) and report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "compare.json"]
    save_json(out / "compare.json", report)
    plot_curves(report, out / "curves.png")
    plot_proxies(report, out / "proxies.png")
    figures = {"Distance curves": ["curves.png"], "Proxies": ["proxies.png"]}
    written += [out / "curves.png", out / "proxies.png"]
    if any(
        "latent" in ((r.get("diagnostics") or {}).get("spectrum") or {}) for r in report["runs"]
    ):
        plot_spectra(report, out / "spectrum.png")
        figures["Latent spectra (diagnostics)"] = ["spectrum.png"]
        written.append(out / "spectrum.png")
    if report["data"]["kind"] == "images":
        lo, hi = report["data"]["min"], report["data"]["max"]
        recon_files, sample_files, probe_files = [], [], []
        for r in report["runs"]:
            imgs = images.get(r["name"])
            if not imgs:
                continue
            slug = _slug(r["name"])
            plot_image_grid(
                [(f"{r['name']}: held-out", imgs["original"]), ("reconstruction", imgs["recon"])],
                lo,
                hi,
                out / f"recon_{slug}.png",
            )
            recon_files.append(f"recon_{slug}.png")
            for key, what, files in (
                ("samples", "prior", sample_files),
                ("probe", "probe", probe_files),
            ):
                if imgs.get(key) is None:
                    continue
                half = (len(imgs[key]) + 1) // 2
                rows = [(f"{r['name']}: decoded {what} samples", imgs[key][:half])]
                plot_image_grid(rows + [("", imgs[key][half:])], lo, hi, out / f"{key}_{slug}.png")
                files.append(f"{key}_{slug}.png")
        figures["Reconstructions (top: held-out data, bottom: reconstruction)"] = recon_files
        figures["Decoded samples from each run's latent prior"] = sample_files
        if probe_files:
            figures["Decoded samples from each run's generation probe"] = probe_files
        written += [out / f for f in recon_files + sample_files + probe_files]
    save_text(out / "report.md", report_markdown(report, figures))
    written.append(out / "report.md")
    return written
