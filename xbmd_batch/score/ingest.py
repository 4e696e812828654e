"""Stages 1-4 as one call: discover -> headers -> META -> join -> plan, before any pixel is decoded.

`score` and `python -m train` both ingest a cohort through this function, so a model is trained on exactly
the (file, META row) pairs it would be scored on: files found by content (never by extension), a subject
key shared by several META rows quarantined (never the first one guessed), duplicate SOPInstanceUIDs, missing
keys and unreadable headers quarantined with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from xbmd_batch.config import MetadataSchema
from xbmd_batch.score.discover import Discovery, discover
from xbmd_batch.score.headers import read_headers
from xbmd_batch.score.join import JoinResult, KeySpec, join_metadata
from xbmd_batch.score.reconcile import Plan, build_plan
from xbmd_batch.score.stopwatch import Stopwatch


@dataclass
class Ingested:
    """What stages 1-4 found: the plan (one row per image to use) and what it was built from."""

    disc: Discovery
    headers: pl.DataFrame
    meta: pl.DataFrame  # META as read (strings), key column named as the join expects
    encoded: Any  # metadata.EncodedMetadata for every META row, under the given schema
    joined: JoinResult
    plan: Plan
    meta_info: Any = None  # metadata.TableInfo: separator, decimal mark, encoding, line of each row

    def meta_keys(self) -> list[str | None]:
        """The subject key of every META row (stripped; None where empty or when the join is by path only)."""
        col = self.joined.meta_key_column
        if not col or col not in self.meta.columns:
            return [None] * self.meta.height
        return [None if v is None else str(v).strip() for v in self.meta.get_column(col).cast(pl.String)]


def ingest(
    dicom_dir: Path,
    meta_path: Path,
    schema: MetadataSchema,
    key_spec: KeySpec = KeySpec(),
    threads: int = 8,
    stopwatch: Stopwatch | None = None,
    follow_symlinks: bool = False,
) -> Ingested:
    """Discover, read headers, read + validate META under ``schema``, join, reconcile (times booked on
    ``stopwatch`` as discover / headers / metadata_join / reconcile)."""
    from xbmd_batch.score import metacheck

    sw = stopwatch or Stopwatch()
    disc = discover(Path(dicom_dir), threads=threads, follow_symlinks=follow_symlinks)
    sw.lap("discover")
    headers = read_headers(Path(dicom_dir), disc.dicom, threads=threads)
    sw.lap("headers")

    read_key = key_spec.key_column or key_spec.path_column or schema.subject_key
    meta, meta_info, enc = metacheck.load_meta(Path(meta_path), schema, read_key)
    joined = join_metadata(
        headers.get_column("relative_path").to_list(),
        headers.get_column("patient_id").to_list(),
        meta,
        key_spec,
        schema.subject_key,
        meta_name=Path(meta_path).name,
    )
    sw.lap("metadata_join")

    issues = metacheck.invalid_records(enc, meta_info, pseudonymized=False)  # privacy drops `raw` if asked
    plan = build_plan(disc, headers, joined, meta.height, issues, int(np.asarray(enc.derived, bool).sum()))
    sw.lap("reconcile")
    return Ingested(disc, headers, meta, enc, joined, plan, meta_info)
