"""Rich tables for the terminal: the reconciliation (before scoring) and the final summary (after)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

_RECON_ROWS: tuple[tuple[str, str, bool], ...] = (
    # (count key, label, is a quarantine that makes the exit code non-zero)
    ("files_seen", "files seen under DIR", False),
    ("hidden_files", "  hidden files (not opened)", False),
    ("non_dicom_files", "  non-DICOM files (not scored)", False),
    ("unreadable_files", "  unreadable files", True),
    ("invalid_file_names", "  DICOMs with non-UTF-8 file names", True),
    ("skipped_links", "  symlinks not followed (broken, loop, folder, leaving DIR)", False),
    ("special_files", "  special files (FIFO, socket, device; not opened)", False),
    ("dicom_files", "  DICOM files", False),
    ("header_errors", "    header unreadable", True),
    ("non_image_dicoms", "    DICOM without pixels (DICOMDIR, SR, ...)", False),
    ("duplicate_sop_instance_uids", "    duplicate SOPInstanceUID (later copies)", True),
    ("images_without_subject_key", "    images without a subject key", True),
    ("images_without_metadata", "    images without metadata", True),
    ("images_with_ambiguous_metadata", "    images with ambiguous metadata (duplicate key)", True),
    ("matched_images", "    matched images -> to score", False),
    ("matched_subjects", "matched subjects", False),
    ("subjects_with_several_images", "  subjects with several images (all scored)", False),
    ("metadata_rows", "metadata rows", False),
    ("metadata_rows_without_images", "  metadata rows without images", True),
    ("metadata_duplicate_keys", "  duplicate subject keys", False),
    ("metadata_invalid_values", "  invalid values (set missing)", False),
    ("metadata_derived_values", "  derived values (e.g. BMI)", False),
)


def reconciliation_table(counts: dict[str, int], key_desc: str) -> Table:
    t = Table(title=f"Reconciliation (before decoding; join: {key_desc})", title_justify="left")
    t.add_column("what")
    t.add_column("count", justify="right")
    for key, label, bad in _RECON_ROWS:
        v = counts.get(key, 0)
        style = "bold red" if bad and v else None
        t.add_row(label, f"{v:,}", style=style)
    return t


def final_table(res: dict[str, Any]) -> list[Table]:
    c = res["counts"]
    tag = " (SYNTHETIC cohort: numbers describe the generator, not patients)" if res.get("synthetic") else ""
    head = Table(title=f"Scoring summary{tag}", title_justify="left")
    head.add_column("what")
    head.add_column("value", justify="right")
    head.add_row("scored images", f"{c.get('scored', 0):,}")
    head.add_row("failures (quarantined + decode/infer errors)", f"{c.get('failures_total', 0):,}")
    head.add_row("  of which during scoring", f"{c.get('failed_in_scoring', 0):,}")
    head.add_row("skipped (already in parts: resumed)", f"{c.get('skipped_resume', 0):,}")
    head.add_row("backend / precision", f"{res['backend']} / {res['precision']}")
    tp = res.get("throughput", {})
    head.add_row("throughput (this session)", f"{tp.get('images_per_s', 0.0):.1f} images/s")
    head.add_row("wall time (this session)", f"{tp.get('wall_s', 0.0):.1f} s")

    stages = Table(title="Stage time", title_justify="left")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    stages.add_column("share", justify="right")
    for k, v in res["timings_s"].items():
        stages.add_row(k, f"{v:.2f}", f"{100 * res['stage_shares'].get(k, 0):.1f} %")

    who = Table(title=f"WHO class ({res['reference']}){' - SYNTHETIC' if res.get('synthetic') else ''}",
                title_justify="left")  # fmt: skip
    who.add_column("class")
    who.add_column("images", justify="right")
    who.add_column("share", justify="right")
    dist = res.get("who_distribution", {})
    n = sum(dist.values()) or 1
    for k, v in dist.items():
        who.add_row(k, f"{v:,}", f"{100 * v / n:.1f} %")
    return [head, stages, who]


def print_tables(console: Console, tables: list[Table]) -> None:
    for t in tables:
        console.print(t)
