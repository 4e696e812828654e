"""Stage 4: plan and reconcile BEFORE any pixel is decoded.

Every entry under DIR and every META row ends in exactly one bucket: scored, quarantined (a failure row with
a reason: unreadable, invalid file name, header, join, ...), or listed as not-an-image (non-DICOM, hidden,
skipped symlink, special file, DICOM without pixels such as DICOMDIR). The same plan is
rebuilt on resume, so quarantine decisions are deterministic: files sorted by relative path, the first copy
of a duplicated SOPInstanceUID is scored and later copies are quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from xbmd_batch.score.discover import Discovery
from xbmd_batch.score.join import JoinResult

# Columns of every failure row (pre-scoring quarantine and per-file decode/infer errors alike).
FAILURE_SCHEMA: dict[str, pl.DataType] = {
    "relative_path": pl.String,
    "subject_key": pl.String,
    "sop_instance_uid": pl.String,
    "meta_row": pl.Int64,
    "stage": pl.String,
    "reason": pl.String,
    "message": pl.String,
}

PLAN_SCHEMA: dict[str, pl.DataType] = {
    "relative_path": pl.String,
    "subject_key": pl.String,
    "sop_instance_uid": pl.String,
    "study_instance_uid": pl.String,
    "meta_row": pl.Int64,
    "image_index_for_subject": pl.Int32,
    "n_images_for_subject": pl.Int32,
    "transfer_syntax_uid": pl.String,
    "photometric": pl.String,
}


@dataclass
class Plan:
    """The work list (one row per image to score) plus everything that will not be scored, and why."""

    items: pl.DataFrame  # PLAN_SCHEMA, sorted by relative_path
    quarantine: pl.DataFrame  # FAILURE_SCHEMA
    counts: dict[str, int]
    listed: dict[str, list[Any]] = field(default_factory=dict)  # non_dicom, hidden, non_image_dicom, ...

    @property
    def n_quarantined(self) -> int:
        return self.quarantine.height


class Quarantine:
    """Collects failure rows (FAILURE_SCHEMA) and counts them by reason."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        stage: str,
        reason: str,
        msg: str,
        rel: str | None = None,
        subj: str | None = None,
        sop: str | None = None,
        meta_row: int | None = None,
    ) -> None:
        self.rows.append(
            {
                "relative_path": rel,
                "subject_key": subj,
                "sop_instance_uid": sop,
                "meta_row": meta_row,
                "stage": stage,
                "reason": reason,
                "message": msg,
            }
        )

    def count(self, reason: str) -> int:
        return sum(r["reason"] == reason for r in self.rows)

    def frame(self) -> pl.DataFrame:
        return (
            pl.DataFrame(self.rows, schema=FAILURE_SCHEMA)
            if self.rows
            else pl.DataFrame(schema=FAILURE_SCHEMA)
        )


def _is_non_image(j: int, h: dict[str, list[Any]]) -> bool:
    """A parsed DICOM without image size that is still a DICOM object (DICOMDIR, structured report, ...)."""
    return bool(h["sop_class_uid"][j] or h["sop_instance_uid"][j] or h["modality"][j]) or (
        h["relative_path"][j].rsplit("/", 1)[-1].upper() == "DICOMDIR"
    )


def _number_images_per_subject(subjects: list[str | None]) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Several images per subject are all scored, numbered in relative-path order: (index, total, groups)."""
    idx = np.zeros(len(subjects), dtype=np.int32)
    tot = np.zeros(len(subjects), dtype=np.int32)
    groups: dict[str | None, list[int]] = {}
    for k, s in enumerate(subjects):
        groups.setdefault(s, []).append(k)
    for members in groups.values():
        for n, k in enumerate(members):
            idx[k], tot[k] = n, len(members)
    return idx, tot, list(groups.values())


def build_plan(
    disc: Discovery,
    headers: pl.DataFrame,
    joined: JoinResult,
    n_meta_rows: int,
    meta_issues: list[dict[str, Any]],
    n_derived_values: int,
) -> Plan:
    """Decide, per file and per META row, scored / quarantined / listed; count everything."""
    q = Quarantine()
    for rel, m in disc.unreadable:
        q.add("discover", "unreadable_file", m, rel)
    for rel, m in disc.bad_names:
        q.add("discover", "invalid_file_name", m, rel)

    h = {c: headers.get_column(c).to_list() for c in headers.columns}
    rel, sop = h["relative_path"], h["sop_instance_uid"]
    non_image: list[str] = []
    keep: list[int] = []
    seen_sop: set[str] = set()
    for j in (int(x) for x in np.argsort(np.array(rel, dtype=object), kind="stable")):
        subj = joined.subject_key[j]
        if h["header_error"][j] is not None:
            q.add("header", "header_unreadable", h["header_error"][j], rel[j])
        elif not h["rows"][j] or not h["columns"][j]:
            if _is_non_image(j, h):
                non_image.append(rel[j])  # listed, not scored
            else:  # parsed, but nothing DICOM-like inside: a damaged file
                msg = "no image attributes, SOP Class/Instance UID or Modality in the header"
                q.add("header", "header_unreadable", msg, rel[j])
        elif sop[j] is None:
            q.add("header", "missing_sop_instance_uid", "DICOM image has no SOPInstanceUID", rel[j], subj)
        elif sop[j] in seen_sop:
            msg = "same SOPInstanceUID as an earlier file, which is scored instead"
            q.add("reconcile", "duplicate_sop_instance_uid", msg, rel[j], subj, sop[j])
        elif joined.issue[j] is not None:
            seen_sop.add(sop[j])
            q.add("join", joined.issue[j], joined.issue_message[j] or "", rel[j], subj, sop[j])
        else:
            seen_sop.add(sop[j])
            keep.append(j)
    for i in joined.meta_rows_without_images:
        q.add("join", "metadata_without_image", f"META row {i} matches no DICOM image", meta_row=i)

    keep_subj = [joined.subject_key[j] for j in keep]
    idx, tot, groups = _number_images_per_subject(keep_subj)
    items = pl.DataFrame(
        {
            "relative_path": [rel[j] for j in keep],
            "subject_key": keep_subj,
            "sop_instance_uid": [sop[j] for j in keep],
            "study_instance_uid": [h["study_instance_uid"][j] for j in keep],
            "meta_row": [int(joined.meta_row[j]) for j in keep],
            "image_index_for_subject": idx,
            "n_images_for_subject": tot,
            "transfer_syntax_uid": [h["transfer_syntax_uid"][j] for j in keep],
            "photometric": [h["photometric"][j] for j in keep],
        },
        schema=PLAN_SCHEMA,
    )
    multi = [m for m in groups if len(m) > 1]
    counts = {
        "files_seen": disc.n_files,
        "hidden_files": len(disc.hidden),
        "non_dicom_files": len(disc.non_dicom),
        "unreadable_files": len(disc.unreadable),
        "skipped_links": len(disc.skipped_links),
        "special_files": len(disc.special),
        "invalid_file_names": len(disc.bad_names),
        "dicom_files": len(rel),
        "header_errors": q.count("header_unreadable"),
        "non_image_dicoms": len(non_image),
        "duplicate_sop_instance_uids": q.count("duplicate_sop_instance_uid"),
        "images_without_metadata": q.count("no_metadata"),
        "images_without_subject_key": q.count("no_subject_key"),
        "images_with_ambiguous_metadata": q.count("ambiguous_metadata"),
        "matched_images": len(keep),
        "matched_subjects": len(groups),
        "subjects_with_several_images": len(multi),
        "images_of_subjects_with_several": sum(len(m) for m in multi),
        "metadata_rows": n_meta_rows,
        "metadata_rows_without_images": len(joined.meta_rows_without_images),
        "metadata_duplicate_keys": len(joined.duplicate_meta_keys),
        "metadata_invalid_values": len(meta_issues),
        "metadata_derived_values": n_derived_values,
        "quarantined_before_scoring": len(q.rows),
    }
    listed = {
        "non_dicom_files": list(disc.non_dicom),
        "hidden_files": list(disc.hidden),
        "skipped_links": [{"path": p, "reason": r} for p, r in disc.skipped_links],
        "special_files": [{"path": p, "kind": k} for p, k in disc.special],
        "non_image_dicoms": non_image,
        "metadata_rows_without_images": list(joined.meta_rows_without_images),
        "metadata_duplicate_keys": [{"key": k, "rows": v} for k, v in joined.duplicate_meta_keys.items()],
        "metadata_invalid_values": meta_issues,
    }
    return Plan(items=items, quarantine=q.frame(), counts=counts, listed=listed)
