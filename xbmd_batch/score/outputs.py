"""The run's own files besides the parts, and how a run ends (docs/outputs.md).

Before scoring: reconciliation.json (`write_reconciliation`) and the uncertainty model the card carries
(`uncertainty`). After `finalize`: run.json, the summary tables and the `ScoreResult` the CLI maps to an exit
code, either for a run that ``--strict`` refused (`refused_strict`) or for a finished session (`finished`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from xbmd_batch.errors import EXIT_OK, EXIT_QUARANTINE, EXIT_STRICT
from xbmd_batch.fsutil import atomic_write_json, now_iso
from xbmd_batch.score import manifest, privacy
from xbmd_batch.score.ingest import Ingested
from xbmd_batch.score.options import ScoreOptions
from xbmd_batch.score.privacy import Pseudonymizer
from xbmd_batch.score.stopwatch import Stopwatch


@dataclass
class ScoreResult:
    exit_code: int
    out_dir: Path
    counts: dict[str, int]
    backend: str = ""
    precision: str = ""
    backend_reason: str = ""
    throughput: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    run_id: str = ""
    preprocess_device: str = ""  # where preprocessing finished ("cpu" = the decode workers)


def write_reconciliation(
    out_dir: Path,
    run_id: str,
    ing: Ingested,
    join_desc: str,
    pseudo: Pseudonymizer,
    meta_report: list[dict[str, Any]],
    meta_accepted: list[str],
) -> None:
    """OUT/reconciliation.json: the plan's counts and lists, every identifier in output form."""
    recon = {
        "run_id": run_id,
        "created": now_iso(),
        "join": join_desc,
        "pseudonymized": pseudo.enabled,
        "counts": ing.plan.counts,
        **privacy.listed_for_output(ing.plan.listed, pseudo, ing.meta_keys()),
        "metadata_warnings": [*ing.encoded.warnings, *meta_accepted],
        "metadata_table": ing.meta_info.describe(),
        "metadata_missingness": meta_report,
    }
    atomic_write_json(out_dir / "reconciliation.json", recon)


def uncertainty(card: Any, ing: Ingested, o: ScoreOptions, console: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The card's out-of-fold residual model (None when the card has none), the cohort-summary strata and
    run.json's "uncertainty" entry (xbmd_batch.uncertainty, issue 15)."""
    from xbmd_batch.score.cohort_summary import strata_table
    from xbmd_batch.uncertainty import ConditionalConformal

    strata = strata_table(ing.encoded.raw_values, card.schema)
    conformal, why_not = ConditionalConformal.from_training_summary(card.training_summary)
    if conformal is None:
        console.print(f"[yellow]uncertainty: {why_not}[/]")
        return None, strata, {"available": False, "reason": why_not}
    return conformal, strata, {**conformal.describe(o.interval), "available": True}


def refused_strict(
    out_dir: Path, run: dict[str, Any], plan: Any, sw: Stopwatch, console: Any, resumed: bool, run_id: str
) -> ScoreResult:
    """After the (empty) finalize of a run ``--strict`` refused: run.json says so, and nothing was scored."""
    manifest.write_run_json(out_dir, manifest.refused_strict(run, plan.n_quarantined, sw.timings))
    console.print(
        f"[bold red]--strict: {plan.n_quarantined} input(s) quarantined before scoring; nothing scored. "
        f"See {out_dir / 'failures.parquet'} and reconciliation.json.[/]"
    )
    return ScoreResult(EXIT_STRICT, out_dir, {**plan.counts, "scored": 0}, resumed=resumed, run_id=run_id)


def finished(
    out_dir: Path, run: dict[str, Any], runner: Any, plan: Any, fin: dict[str, Any], stats: Any,
    todo: Any, workers: int, sw: Stopwatch, extra_counts: dict[str, int], reference: str, console: Any,
    resumed: bool, run_id: str,
) -> ScoreResult:  # fmt: skip
    """After finalize: run.json (the run's manifest + this session's counts and timings), the summary tables,
    and the result (exit 3 when anything was quarantined or failed)."""
    from xbmd_batch.score.cohort_summary import rich_table
    from xbmd_batch.score.summary import final_table, print_tables

    result = manifest.result_info(runner, plan, fin, stats, todo, workers, sw.timings, sw.elapsed())
    result["counts"].update(extra_counts)
    manifest.write_run_json(out_dir, {**run, **result})
    synthetic = run["synthetic_cohort"]
    print_tables(console, final_table({**result, "reference": reference, "synthetic": synthetic}))
    print_tables(console, [rich_table(pl.read_parquet(out_dir / "cohort_summary.parquet"), synthetic)])
    quarantined = fin["failures_total"] > 0 or fin["not_processed"] > 0
    return ScoreResult(
        EXIT_QUARANTINE if quarantined else EXIT_OK,
        out_dir,
        result["counts"],
        runner.backend,
        runner.precision,
        runner.reason,
        result["throughput"],
        result["timings_s"],
        resumed,
        run_id,
        run["preprocess"]["device"],
    )
