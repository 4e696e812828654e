"""`xbmd-batch report RESULTS`: one self-contained HTML cohort report from a `score` output folder.

Everything is read from RESULTS (scores.parquet, cohort_summary.parquet, failures.parquet, run.json,
reconciliation.json); nothing is recomputed from images. Figures are matplotlib PNGs embedded as base64
``data:`` URIs (no external URL, no script, no font download: the file opens from a USB stick) and also
written beside the HTML in ``<stem>_figures/`` for papers. A SYNTHETIC cohort (run.json
``synthetic_cohort``) is labelled on the page and on every figure.

Sections (ids used by tests): provenance, funnel, distribution, prevalence, age, intervals, attention,
timings.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from xbmd_batch.errors import InputError
from xbmd_batch.fsutil import atomic_write_bytes

SECTIONS: tuple[tuple[str, str], ...] = (
    ("provenance", "Run provenance"),
    ("funnel", "Reconciliation: files to scores"),
    ("distribution", "Predicted BMD by sex"),
    ("prevalence", "Prevalence by sex and age band"),
    ("age", "Predicted BMD by age band and sex"),
    ("intervals", "Per-subject interval widths"),
    ("attention", "Per-field metadata attention"),
    ("timings", "Stage timings and throughput"),
)
SYNTH_LABEL = "SYNTHETIC - not patient data"
SEX_COLORS = {"F": "#c0392b", "M": "#2471a3", "missing": "#7f8c8d"}


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


class _Figures:
    """Saves each figure as PNG beside the report and returns an <img> with the same bytes inlined."""

    def __init__(self, folder: Path, synthetic: bool) -> None:
        import matplotlib

        matplotlib.use("Agg")
        self.folder = folder
        self.synthetic = synthetic
        self.written: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)

    def new(self, title: str, figsize: tuple[float, float] = (7.0, 3.6)) -> tuple[Any, Any]:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize, dpi=110)
        ax.set_title(f"{title}{' (SYNTHETIC)' if self.synthetic else ''}", fontsize=10)
        return fig, ax

    def save(self, fig: Any, name: str, alt: str) -> str:
        import matplotlib.pyplot as plt

        if self.synthetic:
            fig.text(0.5, 0.5, "SYNTHETIC", fontsize=44, color="#b03a2e", alpha=0.13, ha="center",
                     va="center", rotation=20, transform=fig.transFigure)  # fmt: skip
            fig.text(0.995, 0.01, SYNTH_LABEL, fontsize=7, color="#b03a2e", ha="right", va="bottom")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        plt.close(fig)
        data = buf.getvalue()
        path = self.folder / f"{name}.png"
        path.write_bytes(data)
        self.written.append(path)
        b64 = base64.b64encode(data).decode("ascii")
        return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


def _read(results: Path) -> dict[str, Any]:
    results = Path(results)
    need = ("scores.parquet", "run.json")
    missing = [n for n in need if not (results / n).is_file()]
    if not results.is_dir() or missing:
        raise InputError(
            f"{results}: not a finished `xbmd-batch score` output (missing {', '.join(missing) or 'folder'})"
        )
    try:
        run = json.loads((results / "run.json").read_text())
    except ValueError as e:
        raise InputError(f"{results / 'run.json'}: unreadable ({e})") from e
    d: dict[str, Any] = {"run": run, "scores": pl.read_parquet(results / "scores.parquet")}
    cs = results / "cohort_summary.parquet"
    d["summary"] = pl.read_parquet(cs) if cs.is_file() else None
    fp = results / "failures.parquet"
    d["failures"] = pl.read_parquet(fp) if fp.is_file() else None
    rp = results / "reconciliation.json"
    d["recon"] = json.loads(rp.read_text()) if rp.is_file() else {}
    return d


def _table(header: list[str], rows: list[list[str]], row_ids: list[str] | None = None) -> str:
    h = "".join(f"<th>{_esc(c)}</th>" for c in header)
    body = []
    for i, r in enumerate(rows):
        rid = f' id="{_esc(row_ids[i])}"' if row_ids else ""
        body.append(f"<tr{rid}>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _provenance(run: dict[str, Any]) -> str:
    m = run.get("model", {})
    v = run.get("versions", {})
    unc = run.get("uncertainty", {})
    ref = run.get("reference", {})
    rows = [
        ["run id", run.get("run_id", "")],
        ["status", run.get("status", "")],
        ["created / finished (UTC)", f"{run.get('created', '')} / {run.get('finished', '')}"],
        ["model sha256", m.get("sha256", "")],
        ["checkpoint sha256", m.get("checkpoint_sha256", "")],
        ["engine sha256", m.get("engine_sha256") or "-"],
        ["backend / precision", f"{run.get('backend', '')} / {run.get('precision', '')}"],
        ["backend choice", run.get("backend_reason", "")],
        ["T-score reference", f"{ref.get('name', '')}: mean {ref.get('mean', '')}, SD {ref.get('sd', '')}"],
        ["interval method", unc.get("method") or f"not available: {unc.get('reason', 'unknown')}"],
        ["interval level", unc.get("level", "-")],
        ["out-of-fold residuals (bins)", f"{unc.get('n_residuals', '-')} ({unc.get('n_bins', '-')})"],
        ["synthetic cohort", "yes (SYNTHETIC)" if run.get("synthetic_cohort") else "no"],
        ["pseudonymised", "yes" if run.get("pseudonymized") else "no"],
        ["versions", ", ".join(f"{k} {val}" for k, val in v.items())],
    ]
    return _table(["what", "value"], [[a, str(b)] for a, b in rows])


def _funnel(d: dict[str, Any], figs: _Figures) -> str:
    run, recon = d["run"], d["recon"]
    c = {**recon.get("counts", {}), **run.get("reconciliation", {})}
    scored = int(run.get("counts", {}).get("scored", d["scores"].height))
    steps = [
        ("files seen", int(c.get("files_seen", 0))),
        ("DICOM files", int(c.get("dicom_files", 0))),
        ("matched images", int(c.get("matched_images", 0))),
        ("scored images", scored),
    ]
    fig, ax = figs.new("Reconciliation funnel")
    ax.barh([s for s, _ in steps][::-1], [n for _, n in steps][::-1], color="#5d6d7e")
    for i, (_, n) in enumerate(steps[::-1]):
        ax.text(n, i, f" {n:,}", va="center", fontsize=8)
    ax.set_xlabel("count")
    img = figs.save(fig, "funnel", "reconciliation funnel")
    out = [
        _table(["stage", "count"], [[s, f"{n:,}"] for s, n in steps], [f"funnel-{i}" for i in range(4)]),
        img,
    ]
    f = d["failures"]
    if f is not None and f.height:
        by = f.group_by("stage", "reason").len().sort("len", descending=True)
        out.append("<h3>Failures by reason</h3>")
        out.append(_table(["stage", "reason", "count"], [[r[0], r[1], f"{r[2]:,}"] for r in by.iter_rows()]))
    else:
        out.append("<p>No failures.</p>")
    return "\n".join(out)


def _distribution(scores: pl.DataFrame, figs: _Figures) -> str:
    fig, ax = figs.new("Predicted femoral-neck BMD by sex")
    sex = scores.get_column("sex").fill_null("missing") if "sex" in scores.columns else None
    bmd = scores.get_column("bmd_pred").to_numpy()
    bins = np.linspace(np.nanmin(bmd) - 0.01, np.nanmax(bmd) + 0.01, 30) if len(bmd) else 10
    rows = []
    groups = sorted(set(sex.to_list())) if sex is not None else ["all"]
    for g in groups:
        x = bmd if sex is None else bmd[(sex == g).to_numpy()]
        ax.hist(x, bins=bins, alpha=0.55, label=f"{g} (n={len(x):,})", color=SEX_COLORS.get(g, "#566573"))
        rows.append(
            [
                g,
                f"{len(x):,}",
                _num(float(np.mean(x))),
                _num(float(np.std(x, ddof=1)) if len(x) > 1 else None),
            ]
        )
    ax.set_xlabel("predicted BMD (g/cm²)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    img = figs.save(fig, "bmd_by_sex", "predicted BMD histogram by sex")
    return _table(["sex", "images", "mean", "SD"], rows) + img


def _prevalence(summary: pl.DataFrame | None, figs: _Figures) -> str:
    if summary is None or summary.height == 0:
        return "<p>No cohort_summary.parquet in this folder (a run from before issue 15).</p>"
    header = ["sex", "age band", "subjects", "mean BMD", "T ≤ −1 (95 % CI)", "naive T ≤ −1",
              "T ≤ −2.5 (95 % CI)", "naive T ≤ −2.5"]  # fmt: skip
    rows, ids = [], []
    for r in summary.iter_rows(named=True):
        row = [r["sex"], r["age_band"], f"{r['n_subjects']:,}", _num(r["mean_bmd_pred"])]
        for s in ("m1", "m2_5"):
            p = r[f"prev_t_le_{s}"]
            row.append(
                "n/a"
                if p is None
                else f"{_pct(p)} [{_pct(r[f'prev_t_le_{s}_lo'])}, {_pct(r[f'prev_t_le_{s}_hi'])}]"
            )
            row.append(f"{_pct(r[f'naive_prev_t_le_{s}'])} ({r[f'naive_n_t_le_{s}']:,})")
        rows.append(row)
        ids.append(f"prev-{r['sex']}-{r['age_band']}")
    note = (
        "<p class=note>Prevalence = mean of each subject's predictive probability P(T ≤ t | prediction) from "
        "the model's out-of-fold residuals (Mondrian conformal bins); 95 % CI by Monte Carlo over resampled "
        "residuals and Bernoulli outcomes (model and outcome uncertainty). Naive = share of subjects whose "
        "predicted T-score is at or below the cut-off: biased low for rare classes because predictions "
        "regress to the mean.</p>"
    )
    out = [note, _table(header, rows, ids)]
    cells = summary.filter(pl.col("age_band") != "all")
    if cells.height and cells.get_column("prev_t_le_m1").null_count() < cells.height:
        fig, axes = figs.new("Prevalence by sex × age band (95 % CI; x = naive count)", (8.0, 3.8))
        x = np.arange(cells.height)
        labels = [f"{a}\n{b}" for a, b in zip(cells["sex"], cells["age_band"], strict=True)]
        for k, (s, col) in enumerate((("m1", "#2e86c1"), ("m2_5", "#922b21"))):
            est = cells[f"prev_t_le_{s}"].to_numpy()
            err = np.vstack(
                [est - cells[f"prev_t_le_{s}_lo"].to_numpy(), cells[f"prev_t_le_{s}_hi"].to_numpy() - est]
            )
            off = -0.15 if k == 0 else 0.15
            lab = "T ≤ −1" if s == "m1" else "T ≤ −2.5"
            axes.errorbar(x + off, 100 * est, yerr=100 * err, fmt="o", color=col, capsize=3, label=lab)
            axes.scatter(x + off, 100 * cells[f"naive_prev_t_le_{s}"].to_numpy(), marker="x", color=col, s=25)
        axes.set_xticks(x, labels, fontsize=7)
        axes.set_ylabel("prevalence (%)")
        axes.legend(fontsize=8)
        out.append(figs.save(fig, "prevalence", "prevalence by sex and age band"))
    return "\n".join(out)


def _age(summary: pl.DataFrame | None, figs: _Figures) -> str:
    if summary is None:
        return "<p>No cohort_summary.parquet.</p>"
    cells = summary.filter(
        (pl.col("age_band") != "all") & (pl.col("sex") != "all") & (pl.col("age_band") != "missing")
    )
    if cells.height == 0:
        return "<p>No age information.</p>"
    fig, ax = figs.new("Mean predicted BMD by age band (band: mean interval bounds)")
    bands = sorted(set(cells["age_band"].to_list()))
    pos = {b: i for i, b in enumerate(bands)}
    for s in sorted(set(cells["sex"].to_list())):
        c = cells.filter(pl.col("sex") == s).sort("age_band")
        xs = np.array([pos[b] for b in c["age_band"]])
        col = SEX_COLORS.get(s, "#566573")
        ax.plot(xs, c["mean_bmd_pred"].to_numpy(), "o-", color=col, label=f"{s}")
        if c["mean_bmd_lo"].null_count() == 0:
            ax.fill_between(
                xs, c["mean_bmd_lo"].to_numpy(), c["mean_bmd_hi"].to_numpy(), color=col, alpha=0.15
            )
    ax.set_xticks(range(len(bands)), bands)
    ax.set_xlabel("age at X-ray (years)")
    ax.set_ylabel("BMD (g/cm²)")
    ax.legend(fontsize=8)
    return figs.save(fig, "bmd_by_age", "predicted BMD by age band and sex")


def _intervals(scores: pl.DataFrame, run: dict[str, Any], figs: _Figures) -> str:
    if "bmd_lo" not in scores.columns or scores.get_column("bmd_lo").null_count() == scores.height:
        reason = run.get("uncertainty", {}).get("reason", "no intervals in scores.parquet")
        return f"<p>No intervals: {_esc(reason)}</p>"
    w = (scores["bmd_hi"] - scores["bmd_lo"]).to_numpy()
    level = float(scores["interval_level"].drop_nulls()[0])
    fig, ax = figs.new(f"{100 * level:.0f} % interval width vs prediction")
    ax.scatter(scores["bmd_pred"].to_numpy(), w, s=6, alpha=0.5, color="#566573")
    ax.set_xlabel("predicted BMD (g/cm²)")
    ax.set_ylabel("interval width (g/cm²)")
    img = figs.save(fig, "interval_width", "interval width against prediction")
    rows = [
        [
            f"{100 * level:.0f} %",
            f"{len(w):,}",
            _num(float(np.median(w))),
            _num(float(w.min())),
            _num(float(w.max())),
        ]
    ]
    extra = ""
    if "bmd_sd_models" in scores.columns and scores["bmd_sd_models"].null_count() < scores.height:
        med = _num(float(scores["bmd_sd_models"].median()), 4)
        extra = f"<p>Fold-ensemble between-model SD: median {med} g/cm².</p>"
    return _table(["level", "images", "median width", "min", "max"], rows) + extra + img


def _attention(scores: pl.DataFrame, figs: _Figures) -> str:
    cols = [c for c in scores.columns if c.startswith("attn_")]
    if not cols or scores.select(cols).null_count().sum_horizontal()[0] == scores.height * len(cols):
        return "<p>The model has no field attention (concat baseline).</p>"
    means = scores.select(pl.col(c).mean() for c in cols).row(0)
    names = [c.removeprefix("attn_") for c in cols]
    fig, ax = figs.new("Mean image→metadata attention per field")
    ax.barh(names[::-1], list(means)[::-1], color="#1f618d")
    ax.set_xlabel("mean attention (rows sum to 1)")
    img = figs.save(fig, "attention", "mean attention per metadata field")
    return (
        _table(["field", "mean attention"], [[n, _num(m, 4)] for n, m in zip(names, means, strict=True)])
        + img
    )


def _timings(run: dict[str, Any], figs: _Figures) -> str:
    t = run.get("timings_s", {}) or {}
    tp = run.get("throughput", {}) or {}
    rows = [[k, f"{v:.2f}", _pct(run.get("stage_shares", {}).get(k))] for k, v in t.items()]
    out = [_table(["stage", "seconds", "share"], rows)]
    out.append(
        _table(
            ["throughput", "value"],
            [[k, str(v)] for k, v in tp.items()]
            + [["machine", ", ".join(f"{k} {v}" for k, v in (run.get("machine") or {}).items())]],
        )  # fmt: skip
    )
    if t:
        fig, ax = figs.new("Main-process seconds per stage")
        ax.barh(list(t)[::-1], list(t.values())[::-1], color="#7d3c98")
        ax.set_xlabel("seconds")
        out.append(figs.save(fig, "timings", "stage timings"))
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f3f4}
img{max-width:100%;display:block;margin:.5em 0}
.synth{background:#fdedec;color:#922b21;border:2px solid #922b21;padding:.5em 1em;font-weight:bold}
.note{font-size:13px;color:#444}
.tag{font-size:13px;color:#fff;background:#922b21;padding:1px 6px;vertical-align:middle}
h2{border-bottom:1px solid #ddd}"""


def build_html(results: Path, fig_dir: Path) -> tuple[str, list[Path]]:
    d = _read(results)
    run = d["run"]
    synthetic = bool(run.get("synthetic_cohort"))
    figs = _Figures(fig_dir, synthetic)
    scores = d["scores"]
    body = {
        "provenance": _provenance(run),
        "funnel": _funnel(d, figs),
        "distribution": _distribution(scores, figs) if scores.height else "<p>No scored images.</p>",
        "prevalence": _prevalence(d["summary"], figs),
        "age": _age(d["summary"], figs),
        "intervals": _intervals(scores, run, figs) if scores.height else "<p>No scored images.</p>",
        "attention": _attention(scores, figs) if scores.height else "<p>No scored images.</p>",
        "timings": _timings(run, figs),
    }
    banner = (
        f'<p class="synth">{SYNTH_LABEL}: every number and figure below describes the synthetic '
        "generator, not patients.</p>"
        if synthetic
        else ""
    )
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>xbmd-batch cohort report{' (SYNTHETIC)' if synthetic else ''}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>xbmd-batch cohort report{' - SYNTHETIC' if synthetic else ''}</h1>",
        banner,
        f"<p class=note>{scores.height:,} scored images; run {_esc(run.get('run_id', ''))}.</p>",
    ]
    for sid, title in SECTIONS:
        tag = ' <span class="tag">SYNTHETIC</span>' if synthetic else ""
        parts.append(f'<section id="{sid}"><h2>{_esc(title)}{tag}</h2>')
        parts.append(body[sid])
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts), figs.written


def write_report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML (default RESULTS/report.html) and its PNGs (``<stem>_figures/``); return its path."""
    results = Path(results)
    out = Path(out) if out is not None else results / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--out {out}: the report is HTML; give a .html file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    text, _ = build_html(results, out.parent / f"{out.stem}_figures")
    atomic_write_bytes(out, text.encode("utf-8"))
    return out
