"""Cohort loading and the preprocessed-image cache for training.

One code path with `score`: files and META rows are ingested by `score`'s own stages 1-4
(`xbmd_batch.score.ingest`: discover by content, headers, join, reconcile), images go through
`xbmd_batch.preprocess.load_and_preprocess`, metadata through `xbmd_batch.metadata.validate_and_encode`, so a
model is never trained on a file-to-row mapping or inputs it will not see at scoring.

Decoding is the slow part (JPEG 2000 costs ~0.1-0.5 s per image), so every cohort is decoded once into a
memory-mapped `.npy` under `<out>/.xbmd_cache/` (or `--cache-dir`), keyed by the sorted file list with
sizes and mtimes *and* `preprocess_fingerprint(cfg)`: touching a file or changing preprocessing makes a new
key and a fresh decode; anything else reuses the array, across epochs, folds, variants and runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from xbmd_batch.config import DEFAULT_SCHEMA, MetadataSchema, PreprocessConfig
from xbmd_batch.errors import InputError
from xbmd_batch.fsutil import atomic_write_json, commit, now_iso
from xbmd_batch.score.join import KeySpec

if TYPE_CHECKING:
    import torch

CACHE_DIRNAME = ".xbmd_cache"


@dataclass
class Cohort:
    """One row per image: its file, subject, label and metadata row (schema columns, raw values)."""

    root: Path
    paths: list[str]  # absolute, sorted
    subject_ids: np.ndarray  # str [N]
    y: np.ndarray  # float64 [N], the label column (g/cm^2)
    meta_df: pl.DataFrame  # [N rows] subject_id + schema fields, aligned with paths
    meta_row: np.ndarray  # int64 [N]: each image's row in the META table (what `score` writes as meta_row)
    label_col: str
    mapping: str  # how files met META rows, e.g. "PatientID <-> META['subject_id']"
    cohort_info: dict[str, Any] | None  # cohort.json (synthetic cohorts) or None
    notes: list[str] = field(default_factory=list)  # dropped rows etc., for the report

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def is_synthetic(self) -> bool:
        return self.cohort_info is not None

    @property
    def n_subjects(self) -> int:
        return int(len(np.unique(self.subject_ids)))


def load_cohort(
    cohort_dir: str | os.PathLike[str],
    meta_path: str | os.PathLike[str] | None = None,
    labels_path: str | os.PathLike[str] | None = None,
    label_col: str = "bmd_dxa",
    schema: MetadataSchema = DEFAULT_SCHEMA,
    key_spec: KeySpec | None = None,
    threads: int = 8,
) -> Cohort:
    """Images + labels + metadata, one row per labelled image, sorted by path.

    Files and META rows go through `score`'s own stages 1-4 (`xbmd_batch.score.ingest`): DICOMs found by
    content, joined to META by PatientID (or ``key_spec``), and everything `score` would quarantine
    (duplicate subject keys, missing keys or META rows, duplicate SOPInstanceUIDs, unreadable headers) is left
    out and counted in ``notes``. Labels attach by subject key; a subject whose label is not one finite number
    (absent, empty, or on several label rows) is left out too.
    """
    from xbmd_batch import metadata
    from xbmd_batch.score.ingest import ingest

    root = Path(cohort_dir).resolve()
    if not root.is_dir():
        raise InputError(f"{root}: cohort folder not found")
    meta_p = Path(meta_path) if meta_path else root / "meta.csv"
    labels_p = Path(labels_path) if labels_path else root / "truth.csv"
    key = schema.subject_key
    spec = key_spec or KeySpec()
    labels = metadata.read_table(labels_p, subject_key=key)
    if label_col not in labels.columns:
        raise InputError(f"{labels_p}: no label column {label_col!r} (has {labels.columns})")

    ing = ingest(root, meta_p, schema, spec, threads=threads)
    notes = [
        f"{n} {what} left out by reconciliation (the rules `score` applies)"
        for what, n in ing.plan.quarantine.group_by("reason").len().sort("reason").iter_rows()
    ]
    lab = labels.select(
        pl.col(key).cast(pl.String).str.strip_chars().alias("subject_key"),
        pl.col(label_col).cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False).alias("__y"),
    ).filter(pl.col("subject_key").is_not_null() & (pl.col("subject_key") != ""))
    dup = lab.group_by("subject_key").len().filter(pl.col("len") > 1)
    if dup.height:
        notes.append(f"{dup.height} subject(s) with several rows in {labels_p.name}: their images left out")
        lab = lab.join(dup.select("subject_key"), on="subject_key", how="anti")
    df = ing.plan.items.join(lab, on="subject_key", how="left").sort("relative_path")
    unlabelled = df.filter(pl.col("__y").is_null() | pl.col("__y").is_nan())
    if unlabelled.height:
        notes.append(f"{unlabelled.height} image(s) without a finite {label_col!r} label dropped")
    df = df.filter(pl.col("__y").is_not_null() & pl.col("__y").is_not_nan())
    if df.height == 0:
        raise InputError(f"{root}: no image matches a labelled subject in {labels_p}")
    no_image = set(lab["subject_key"].to_list()) - set(df["subject_key"].to_list())
    if no_image:
        notes.append(f"{len(no_image)} labelled subject(s) without an image")
    absent = [c for c in schema.names if c not in ing.meta.columns]
    if absent:
        notes.append(f"metadata table lacks {absent}; treated as missing")
    cols = [c for c in schema.names if c in ing.meta.columns]
    meta_rows = ing.meta.select(cols)[df["meta_row"].to_numpy()].with_columns(
        pl.Series(key, df["subject_key"].to_list(), pl.String)
    )

    info_p = root / "cohort.json"
    return Cohort(
        root=root,
        paths=[str(root / rel) for rel in df["relative_path"].to_list()],
        subject_ids=np.asarray(df["subject_key"].to_list(), dtype=object).astype(str),
        y=df["__y"].to_numpy().astype(np.float64),
        meta_df=meta_rows.select(key, *cols),
        meta_row=df["meta_row"].to_numpy().astype(np.int64),
        label_col=label_col,
        mapping=spec.describe(key),
        cohort_info=json.loads(info_p.read_text()) if info_p.is_file() else None,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------- metadata
@dataclass
class EncodedFold:
    """Metadata encoded with normalisation stats fitted on one fold's training rows only."""

    schema: MetadataSchema  # with the fitted stats: goes into the checkpoint
    values: np.ndarray  # float32 [N, F]
    mask: np.ndarray  # float32 [N, F]
    n_invalid: int  # cells rejected by validation (encoded as missing)


def encode_metadata(cohort: Cohort, schema: MetadataSchema, fit_rows: np.ndarray) -> EncodedFold:
    """fit_stats on the training subjects (one row per subject), then encode every row with those stats."""
    from xbmd_batch.metadata import fit_stats, validate_and_encode

    key = schema.subject_key
    df = cohort.meta_df  # absent columns: validate_and_encode marks them missing for every row
    train_df = df[np.sort(np.asarray(fit_rows))].unique(key, keep="first", maintain_order=True)
    fitted = fit_stats(train_df, schema)
    fitted_schema = fitted if isinstance(fitted, MetadataSchema) else schema.with_stats(fitted)
    enc = validate_and_encode(df, fitted_schema)
    values = np.asarray(enc.values, dtype=np.float32)
    mask = np.asarray(enc.mask, dtype=np.float32)
    if values.shape != (df.height, len(schema.fields)):
        raise RuntimeError(
            f"encoded metadata has shape {values.shape}, expected {(df.height, len(schema.fields))}"
        )
    return EncodedFold(fitted_schema, values, mask, len(enc.invalid))


@dataclass
class ArrayData:
    """Everything a fold needs, indexed by row i of the cohort."""

    images: np.ndarray  # [M, 1, S, S] float32 (memmap); row_of[i] is row i's image
    row_of: np.ndarray  # int64 [N]
    meta: np.ndarray  # float32 [N, F]
    mask: np.ndarray  # float32 [N, F]
    y: np.ndarray  # float32 [N]
    norm_mean: float = 0.5  # PreprocessConfig norm, to jitter intensities in [0, 1] space
    norm_std: float = 0.25

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[Any, ...]:
        """(image, meta, mask, y) tensors on device for rows idx (sorted), plus the sorted rows."""
        import torch

        order = np.sort(idx)  # sorted reads are kinder to a memmap; order within a batch is irrelevant
        img = torch.from_numpy(np.ascontiguousarray(self.images[self.row_of[order]]))  # (B, 1, S, S)
        meta = torch.from_numpy(self.meta[order])  # (B, F)
        mask = torch.from_numpy(self.mask[order])  # (B, F)
        y = torch.from_numpy(self.y[order])  # (B,)
        return tuple(t.to(device, non_blocking=True) for t in (img, meta, mask, y)) + (order,)


class ArrayDataBuilder:
    """A cohort plus its image cache: per-fold metadata encodings and the ArrayData to train on."""

    def __init__(
        self, cohort: Cohort, cache: ImageCache, pp: PreprocessConfig, schema: MetadataSchema = DEFAULT_SCHEMA
    ):
        self.cohort, self.cache, self.pp, self.schema = cohort, cache, pp, schema

    def encode(self, fit_rows: np.ndarray) -> EncodedFold:
        return encode_metadata(self.cohort, self.schema, fit_rows)

    def arrays(self, enc: EncodedFold) -> ArrayData:
        return ArrayData(
            images=self.cache.images,
            row_of=self.cache.row_of,
            meta=enc.values,
            mask=enc.mask,
            y=self.cohort.y.astype(np.float32),
            norm_mean=self.pp.norm_mean,
            norm_std=self.pp.norm_std,
        )


# ------------------------------------------------------------------------------------------- image cache
@dataclass
class ImageCache:
    """Decoded, preprocessed images: `images[row_of[i]]` is `paths[i]` (an [M, 1, S, S] float32 memmap)."""

    images: np.ndarray
    row_of: np.ndarray  # int64 [N] cache row of each requested path
    ok: np.ndarray  # bool [N] decoded without error
    errors: dict[str, str]  # path -> message
    path: Path
    key: str
    reused: bool


def cache_key(paths: Sequence[str], cfg: PreprocessConfig) -> str:
    """sha256 over the sorted (path, size, mtime_ns) list and the preprocessing fingerprint."""
    from xbmd_batch.preprocess import preprocess_fingerprint

    h = hashlib.sha256()
    for p in sorted(set(paths)):
        st = os.stat(p)
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    h.update(b"preprocess:" + preprocess_fingerprint(cfg).encode())
    return h.hexdigest()[:24]


def build_image_cache(
    paths: Sequence[str],
    cfg: PreprocessConfig,
    cache_dir: str | os.PathLike[str],
    workers: int = 1,
    progress: bool = True,
) -> ImageCache:
    """Return the cached array for (paths, cfg), decoding with score's DecodePool if the key is new.

    Written to a temp name and renamed, so an interrupted decode never leaves a half cache behind.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    uniq = sorted(set(paths))
    row = {p: i for i, p in enumerate(uniq)}
    row_of = np.asarray([row[p] for p in paths], dtype=np.int64)
    key = cache_key(uniq, cfg)
    npy = cache_dir / f"images-{cfg.image_size}px-{key}.npy"
    side = npy.with_suffix(".json")
    s = cfg.image_size
    if npy.is_file() and side.is_file():
        meta = json.loads(side.read_text())
        if meta.get("key") == key and meta.get("paths") == uniq:
            arr = np.load(npy, mmap_mode="r")
            if arr.shape == (len(uniq), 1, s, s):
                ok_u = np.asarray(meta["ok"], dtype=bool)
                return ImageCache(arr, row_of, ok_u[row_of], meta.get("errors", {}), npy, key, True)

    tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(uniq), 1, s, s))
    ok_u = np.zeros(len(uniq), dtype=bool)
    errors: dict[str, str] = {}
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from xbmd_batch.score.decode import DecodePool

    # score's own decode pool (forkserver workers, bounded in-flight tasks, crash retry): the same decode and
    # preprocessing path, and the same rule that a file decoding to NaN/inf is a failure, not a training image
    paths = pa.array(uniq, type=pa.large_string())  # absolute paths: Path("/") / p is p
    with (
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            disable=not progress,
            transient=False,
        ) as bar,
        DecodePool(Path("/"), paths, cfg, workers if workers > 1 and len(uniq) >= 4 else 0) as pool,
    ):
        task = bar.add_task(f"decode {len(uniq)} DICOMs -> {s}px", total=len(uniq))
        pool.start(np.arange(len(uniq), dtype=np.int64))
        for dec in pool.results():
            out[dec.idx[dec.ok]] = dec.images[dec.ok]
            ok_u[dec.idx[dec.ok]] = True
            errors.update({uniq[i]: f"{reason}: {msg}" for i, reason, msg in dec.failures})
            bar.advance(task, len(dec.idx))
    out.flush()  # the rename below is safe with the map still open (POSIX)
    commit(tmp, npy)
    atomic_write_json(
        side,
        {
            "key": key,
            "preprocess": cfg.to_dict(),
            "n": len(uniq),
            "n_ok": int(ok_u.sum()),
            "created": now_iso(),
            "paths": uniq,
            "ok": ok_u.tolist(),
            "errors": errors,
        },
    )
    if errors:
        warnings.warn(f"{len(errors)} file(s) failed to decode and are excluded (see {side})", stacklevel=2)
    arr = np.load(npy, mmap_mode="r")
    return ImageCache(arr, row_of, ok_u[row_of], errors, npy, key, False)


def default_cache_dir(out_dir: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    """`--cache-dir` when given, else `<out>/.xbmd_cache/`.

    Never the cohort folder: we write only where the user told us to (the run folder, or an explicit
    `--cache-dir` to share one decode across runs).
    """
    d = Path(cache_dir) if cache_dir else Path(out_dir) / CACHE_DIRNAME
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the image cache folder {d}: {e}") from e
    return d
