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


def _fail(
    rel: str | None, subj: str | None, sop: str | None, row: int | None, stage: str, reason: str, msg: str
):
    return {
        "relative_path": rel,
        "subject_key": subj,
        "sop_instance_uid": sop,
        "meta_row": row,
        "stage": stage,
        "reason": reason,
        "message": msg,
    }


def build_plan(
    disc: Discovery,
    headers: pl.DataFrame,
    joined: JoinResult,
    n_meta_rows: int,
    meta_issues: list[dict[str, Any]],
    n_derived_values: int,
) -> Plan:
    """Decide, per file and per META row, scored / quarantined / listed; count everything."""
    fails: list[dict[str, Any]] = []
    for rel, m in disc.unreadable:
        fails.append(_fail(rel, None, None, None, "discover", "unreadable_file", m))
    for rel, m in disc.bad_names:
        fails.append(_fail(rel, None, None, None, "discover", "invalid_file_name", m))

    rel = headers.get_column("relative_path").to_list()
    sop = headers.get_column("sop_instance_uid").to_list()
    herr = headers.get_column("header_error").to_list()
    rows = headers.get_column("rows").to_list()
    cols = headers.get_column("columns").to_list()
    study = headers.get_column("study_instance_uid").to_list()
    ts = headers.get_column("transfer_syntax_uid").to_list()
    phot = headers.get_column("photometric").to_list()
    sop_class = headers.get_column("sop_class_uid").to_list()
    modality = headers.get_column("modality").to_list()
    n_bad_header = sum(e is not None for e in herr)

    non_image: list[str] = []
    keep: list[int] = []
    seen_sop: dict[str, str] = {}
    n_dup = 0
    reasons_count: dict[str, int] = {}
    order = np.argsort(np.array(rel, dtype=object), kind="stable")
    for j in (int(x) for x in order):
        subj = joined.subject_key[j]
        if herr[j] is not None:
            fails.append(_fail(rel[j], None, None, None, "header", "header_unreadable", herr[j]))
            continue
        if not rows[j] or not cols[j]:
            if sop_class[j] or sop[j] or modality[j] or rel[j].rsplit("/", 1)[-1].upper() == "DICOMDIR":
                non_image.append(rel[j])  # DICOMDIR, structured reports, ...: listed, not scored
            else:  # parsed, but nothing DICOM-like inside: a damaged file
                fails.append(
                    _fail(
                        rel[j],
                        None,
                        None,
                        None,
                        "header",
                        "header_unreadable",
                        "no image attributes, SOP Class/Instance UID or Modality in the header",
                    )
                )
                n_bad_header += 1
            continue
        if sop[j] is None:
            fails.append(
                _fail(
                    rel[j],
                    subj,
                    None,
                    None,
                    "header",
                    "missing_sop_instance_uid",
                    "DICOM image has no SOPInstanceUID",
                )
            )
            continue
        if sop[j] in seen_sop:
            n_dup += 1
            fails.append(
                _fail(
                    rel[j],
                    subj,
                    sop[j],
                    None,
                    "reconcile",
                    "duplicate_sop_instance_uid",
                    "same SOPInstanceUID as an earlier file, which is scored instead",
                )
            )
            continue
        seen_sop[sop[j]] = rel[j]
        if joined.issue[j] is not None:
            reasons_count[joined.issue[j]] = reasons_count.get(joined.issue[j], 0) + 1
            fails.append(
                _fail(rel[j], subj, sop[j], None, "join", joined.issue[j], joined.issue_message[j] or "")
            )
            continue
        keep.append(j)

    for i in joined.meta_rows_without_images:
        fails.append(
            _fail(
                None, None, None, i, "join", "metadata_without_image", f"META row {i} matches no DICOM image"
            )
        )

    keep_rel = [rel[j] for j in keep]
    keep_subj = [joined.subject_key[j] for j in keep]
    # Several images per subject: all scored, numbered in relative-path order.
    idx = np.zeros(len(keep), dtype=np.int32)
    tot = np.zeros(len(keep), dtype=np.int32)
    groups: dict[str | None, list[int]] = {}
    for k, s in enumerate(keep_subj):
        groups.setdefault(s, []).append(k)
    for members in groups.values():
        for n, k in enumerate(members):
            idx[k], tot[k] = n, len(members)
    items = pl.DataFrame(
        {
            "relative_path": keep_rel,
            "subject_key": keep_subj,
            "sop_instance_uid": [sop[j] for j in keep],
            "study_instance_uid": [study[j] for j in keep],
            "meta_row": [int(joined.meta_row[j]) for j in keep],
            "image_index_for_subject": idx,
            "n_images_for_subject": tot,
            "transfer_syntax_uid": [ts[j] for j in keep],
            "photometric": [phot[j] for j in keep],
        },
        schema=PLAN_SCHEMA,
    )
    quarantine = pl.DataFrame(fails, schema=FAILURE_SCHEMA) if fails else pl.DataFrame(schema=FAILURE_SCHEMA)
    multi = [m for m in groups.values() if len(m) > 1]
    counts = {
        "files_seen": disc.n_files,
        "hidden_files": len(disc.hidden),
        "non_dicom_files": len(disc.non_dicom),
        "unreadable_files": len(disc.unreadable),
        "skipped_links": len(disc.skipped_links),
        "special_files": len(disc.special),
        "invalid_file_names": len(disc.bad_names),
        "dicom_files": len(rel),
        "header_errors": n_bad_header,
        "non_image_dicoms": len(non_image),
        "duplicate_sop_instance_uids": n_dup,
        "images_without_metadata": reasons_count.get("no_metadata", 0),
        "images_without_subject_key": reasons_count.get("no_subject_key", 0),
        "images_with_ambiguous_metadata": reasons_count.get("ambiguous_metadata", 0),
        "matched_images": len(keep),
        "matched_subjects": len(groups),
        "subjects_with_several_images": len(multi),
        "images_of_subjects_with_several": sum(len(m) for m in multi),
        "metadata_rows": n_meta_rows,
        "metadata_rows_without_images": len(joined.meta_rows_without_images),
        "metadata_duplicate_keys": len(joined.duplicate_meta_keys),
        "metadata_invalid_values": len(meta_issues),
        "metadata_derived_values": n_derived_values,
        "quarantined_before_scoring": len(fails),
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
    return Plan(items=items, quarantine=quarantine, counts=counts, listed=listed)
