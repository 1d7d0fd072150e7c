"""The `svdkit inspect` outputs: spectrum.csv, spectrum.json and one self-contained report.html.

The HTML has no external reference (no script, font or CDN): plots are matplotlib PNGs embedded as base64
``data:`` URIs, so the file renders offline and can be mailed around. Sections: a summary card, layer ×
module heatmaps of α and of the effective rank, per-depth curves, the α histogram with the HTSR band
[2, 6] marked, with a base the intruder table, its ε sweep and the spectrum-change plots, the data
signals when data was given, and recommendations (per-layer ranks at a target energy for
``svdkit compress`` / EVA-style rank allocation, and the layers outside the α band).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import statistics
from pathlib import Path

from svdkit.core.files import atomic_dir
from svdkit.inspection.esd import ALPHA_BAND

SCHEMA = 1
EPS_SWEEP = (0.3, 0.5, 0.7, 0.9)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if _finite(r.get(key))]
    return statistics.median(vals) if vals else float("nan")


def summary(rows: list[dict]) -> dict:
    """Medians and counts a person reads first (JSON-able)."""
    alphas = [r["alpha"] for r in rows if _finite(r.get("alpha"))]
    out = {"matrices": len(rows), "heads": sum(bool(r["head"]) for r in rows),
           "median_alpha": _median(rows, "alpha"), "median_alpha_weighted": _median(rows, "alpha_weighted"),
           "median_stable_rank": _median(rows, "stable_rank"), "median_effective_rank": _median(rows, "effective_rank"),
           "alpha_below_2": sum(a < ALPHA_BAND[0] for a in alphas), "alpha_above_6": sum(a > ALPHA_BAND[1] for a in alphas),
           "ks_above_0.1": sum(r["alpha_D"] > 0.1 for r in rows if _finite(r.get("alpha_D"))),
           "mp_spikes_total": sum(r["mp_spikes"] for r in rows)}  # fmt: skip
    compared = [r for r in rows if r.get("has_base")]
    if compared:
        out.update(compared=len(compared), intruders_total=sum(r["intruders"] for r in compared),
                   layers_with_intruders=sum(r["intruders"] > 0 for r in compared),
                   median_delta_rel_fro=_median(compared, "delta_rel_fro"),
                   intruders_by_eps={str(e): sum(sum(c < e for c in r["intruder_cos"]) for r in compared) for e in EPS_SWEEP})
    return out


def recommendations(rows: list[dict], energy: float = 0.9) -> dict:
    """Per-matrix ranks keeping ``energy`` of ‖W‖²_F (0.9 → rank_90, 0.99 → rank_99): the per-layer rank
    input of ``svdkit compress`` and EVA-style rank allocation; and the matrices outside the α band."""
    key = {0.9: "rank_90", 0.99: "rank_99"}.get(energy)
    if key is None:
        raise ValueError(f"energy must be 0.9 or 0.99 (the columns spectrum() computes), got {energy}.")
    outside = [{"name": r["name"], "alpha": r["alpha"], "warning": r["warning"]} for r in rows if r["warning"]]
    return {"energy": energy, "ranks": {r["name"]: r[key] for r in rows},
            "parameters_kept": sum(r[key] * (r["m"] + r["n"]) for r in rows) / max(1, sum(r["m"] * r["n"] for r in rows)),
            "alpha_outside_band": outside}  # fmt: skip


def _cell(v) -> str:
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return "" if v is None else str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([_cell(r.get(k)) for k in keys])


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


# -- plots --------------------------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _grid(rows: list[dict], key: str):
    """(layers, modules, matrix of values) for rows with a block index; NaN where missing."""
    inside = [r for r in rows if r["layer"] is not None and _finite(r.get(key))]
    layers = sorted({r["layer"] for r in inside})
    modules = list(dict.fromkeys(r["module"] for r in inside))
    grid = [[float("nan")] * len(modules) for _ in layers]
    for r in inside:
        grid[layers.index(r["layer"])][modules.index(r["module"])] = float(r[key])
    return layers, modules, grid


def _heatmap(rows, key, title, cmap="viridis", limits=None):
    import matplotlib.pyplot as plt
    import numpy as np

    layers, modules, grid = _grid(rows, key)
    if not layers:
        return None
    data = np.ma.masked_invalid(np.array(grid, dtype=float))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(modules), 1.2 + 0.22 * len(layers)))
    kw = {} if limits is None else {"vmin": limits[0], "vmax": limits[1]}
    im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest", **kw)
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(v) for v in layers])
    ax.set_ylabel("block")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _png(fig)


def _depth(rows, keys_titles):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys_titles), figsize=(5.2 * len(keys_titles), 3.6))
    axes = axes if len(keys_titles) > 1 else [axes]
    drawn = False
    for ax, (key, title) in zip(axes, keys_titles):
        layers, modules, grid = _grid(rows, key)
        for j, mod in enumerate(modules):
            ax.plot(layers, [g[j] for g in grid], marker=".", label=mod)
            drawn = True
        if key == "alpha":
            ax.axhspan(*ALPHA_BAND, color="green", alpha=0.08)
        ax.set_xlabel("block")
        ax.set_title(title)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7, ncol=2)
    return _png(fig)


def _alpha_hist(rows):
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows if _finite(r.get("alpha"))]
    if not alphas:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist([min(a, 12.0) for a in alphas], bins=40, color="#4472c4")
    ax.axvspan(*ALPHA_BAND, color="green", alpha=0.12, label="2 ≤ α ≤ 6 (HTSR band)")
    for edge in ALPHA_BAND:
        ax.axvline(edge, color="green", ls="--", lw=1)
    ax.set_xlabel("α (values above 12 drawn at 12)")
    ax.set_ylabel("matrices")
    ax.legend()
    return _png(fig)


def _sigma_change(rows):
    import matplotlib.pyplot as plt

    compared = [r for r in rows if r.get("has_base")]
    if not compared:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.6))
    for r in compared:
        axes[0].plot(range(1, len(r["sigma_change"]) + 1), r["sigma_change"], color="#4472c4", alpha=0.25, lw=0.8)
    axes[0].axhline(0, color="black", lw=0.6)
    axes[0].set_xlabel("singular value index j")
    axes[0].set_title("(σ_j − σ⁰_j)/σ⁰_j, one line per matrix")
    flat = [c for r in compared for c in r["intruder_cos"]]
    axes[1].hist(flat, bins=30, color="#c0504d")
    axes[1].axvline(0.5, color="black", ls="--", lw=1, label="ε = 0.5")
    axes[1].set_xlabel("max |cos| of a top-k direction with the base")
    axes[1].legend()
    return _png(fig)


# -- HTML -------------------------------------------------------------------------------------------
CSS = ("body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}table{border-collapse:collapse;font-size:13px;"
       "margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#eef}td:first-child,"
       "th:first-child{text-align:left}.card{background:#f6f8fb;border:1px solid #dde;padding:10px 16px;border-radius:6px}"
       "img{max-width:100%;display:block;margin:8px 0}h2{border-bottom:2px solid #4472c4;padding-bottom:3px}")  # fmt: skip


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(records: list[dict], keys: list[str], limit: int = 60) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>" for r in records[:limit])
    more = f"<p>… {len(records) - limit} more in spectrum.csv</p>" if len(records) > limit else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _img(uri, alt) -> str:
    return f'<img alt="{html.escape(alt)}" src="{uri}">' if uri else f"<p>({html.escape(alt)}: nothing to plot)</p>"


def render_html(rows: list[dict], meta: dict, signals: dict | None = None) -> str:
    """The report as one HTML string (plots embedded)."""
    import matplotlib

    matplotlib.use("Agg")
    s, rec = summary(rows), recommendations(rows)
    parts = [f"<h1>svdkit inspect: {html.escape(str(meta.get('model', '')))}</h1>", '<div class="card">',
             _table([{"": k, "value": v} for k, v in {**meta, **s}.items() if not isinstance(v, dict)], ["", "value"], 99),
             "</div><h2>Heatmaps (block × module)</h2>",
             _img(_heatmap(rows, "alpha", "power-law α (HTSR band 2–6; colours saturate at 0 and 8)", "coolwarm", limits=(0.0, 8.0)), "alpha heatmap"),
             _img(_heatmap(rows, "effective_rank", "effective rank (Roy–Vetterli)"), "effective rank heatmap"),
             "<h2>Per-depth curves</h2>",
             _img(_depth(rows, [("alpha", "α"), ("effective_rank", "effective rank"), ("stable_rank", "stable rank")]), "depth curves"),
             "<h2>α histogram</h2>", _img(_alpha_hist(rows), "alpha histogram")]  # fmt: skip
    heads = [r for r in rows if r["head"] or r["layer"] is None]
    if heads:
        parts += ["<h3>Matrices outside the block grid (output head flagged)</h3>",
                  _table(heads, ["name", "head", "m", "n", "alpha", "alpha_D", "effective_rank", "stable_rank", "sigma_max"])]  # fmt: skip
    compared = [r for r in rows if r.get("has_base")]
    if compared:
        with_intr = sorted(compared, key=lambda r: (-r["intruders"], -r["intruder_energy"]))
        parts += ["<h2>What changed relative to the base</h2>",
                  "<p>Intruders: top-k singular directions of the new weight whose best |cos| with every base direction is "
                  "below ε (Shuttleworth et al. 2024). ε sweep, total over all matrices:</p>",
                  _table([{"ε": e, "intruders": n} for e, n in s["intruders_by_eps"].items()], ["ε", "intruders"]),
                  _img(_heatmap(rows, "intruders", "intruders (k = 10, ε = 0.5)", "Reds"), "intruder heatmap"),
                  _img(_heatmap(rows, "delta_rel_fro", "‖ΔW‖_F / ‖W₀‖_F", "magma"), "delta heatmap"),
                  _img(_sigma_change(rows), "spectrum change"),
                  _table(with_intr, ["name", "intruders", "intruder_energy", "subspace_overlap", "subspace_angle_max",
                                     "top_sigma_change", "delta_sigma_max", "delta_rel_fro", "adapter_rank"], 40)]  # fmt: skip
    if signals:
        parts += ["<h2>Data signals</h2>", f"<p>data: {html.escape(str(signals.get('data', '')))}</p>"]
        if signals.get("nuclear_norm_score"):
            parts.append(_table([signals["nuclear_norm_score"]], list(signals["nuclear_norm_score"])))
        if signals.get("gradient_spectrum"):
            parts.append(_table(signals["gradient_spectrum"], ["name", "grad_nuclear_norm", "grad_effective_rank", "grad_fro"], 80))
    outside = rec["alpha_outside_band"]
    ranks = [{"name": n, "rank_90": r["rank_90"], "rank_99": r["rank_99"], "of": min(r["m"], r["n"])}
             for n, r in ((r["name"], r) for r in rows)]  # fmt: skip
    parts += ["<h2>Recommendations</h2>",
              f"<p>Compression: keeping 90 % of each matrix's energy needs the ranks below "
              f"({rec['parameters_kept']:.1%} of the parameters as factors; spectrum.json → recommendations.ranks is "
              "the per-layer rank input for <code>svdkit compress</code> and EVA-style rank allocation).</p>",
              _table(ranks, ["name", "rank_90", "rank_99", "of"], 400),
              f"<p>{len(outside)} matrices have α outside [2, 6] (α &lt; 2: possibly over-trained / memorizing; α &gt; 6: "
              "close to random, under-trained or a poor power-law fit — check alpha_D).</p>",
              _table(outside, ["name", "alpha", "warning"], 200)]  # fmt: skip
    body = "\n".join(parts)
    return f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>svdkit inspect</title><style>{CSS}</style></head><body>{body}</body></html>'


def write_report(rows: list[dict], out: str | os.PathLike, meta: dict, signals: dict | None = None, *, overwrite=False) -> Path:
    """Write spectrum.csv, spectrum.json and report.html into ``out`` atomically; returns ``out``."""
    out = Path(out)
    doc = {"schema": SCHEMA, "meta": meta, "summary": summary(rows), "recommendations": recommendations(rows),
           "rows": rows, "signals": signals or {}}  # fmt: skip
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_csv(rows, tmp / "spectrum.csv")
        (tmp / "spectrum.json").write_text(json.dumps(_json_safe(doc), indent=1) + "\n")
        (tmp / "report.html").write_text(render_html(rows, meta, signals))
    return out
