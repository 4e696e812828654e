"""Cohort loading and the preprocessed-image cache for training.

One code path with `score`: images go through `xbmd_batch.preprocess.load_and_preprocess`, metadata through
`xbmd_batch.metadata.validate_and_encode`, so a model is never trained on inputs it will not see at scoring.

Decoding is the slow part (JPEG 2000 costs ~0.1-0.5 s per image), so every cohort is decoded once into a
memory-mapped `.npy` under `<out>/.xbmd_cache/` (or `--cache-dir`), keyed by the sorted file list with
sizes and mtimes *and* `preprocess_fingerprint(cfg)`: touching a file or changing preprocessing makes a new
key and a fresh decode; anything else reuses the array, across epochs, folds, variants and runs.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from xbmd_batch.config import DEFAULT_SCHEMA, MetadataSchema, PreprocessConfig
from xbmd_batch.errors import InputError
from xbmd_batch.fsutil import atomic_write_json, commit, now_iso

if TYPE_CHECKING:
    import torch

CACHE_DIRNAME = ".xbmd_cache"
# truth-table columns that may hold each image's path (relative to the cohort root or the table's folder)
PATH_COLUMNS: tuple[str, ...] = (
    "path",
    "file",
    "relpath",
    "rel_path",
    "file_path",
    "filepath",
    "dicom_path",
    "image_path",
    "dicom",
    "dicom_file",
)


@dataclass
class Cohort:
    """One row per image: its file, subject, label and metadata row (schema columns, raw values)."""

    root: Path
    paths: list[str]  # absolute, sorted
    subject_ids: np.ndarray  # str [N]
    y: np.ndarray  # float64 [N], the label column (g/cm^2)
    meta_df: pl.DataFrame  # [N rows] subject_id + schema fields, aligned with paths
    label_col: str
    mapping: str  # "truth-path-column:<col>" or "dicom-patient-id"
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


def _read_table(path: Path) -> pl.DataFrame:
    """CSV or parquet; subject ids stay strings (leading zeros matter)."""
    if not path.is_file():
        raise InputError(f"{path}: table not found")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema_length=10000, schema_overrides={"subject_id": pl.Utf8})
    except Exception as e:  # polars raises many types for malformed files
        raise InputError(f"{path}: cannot read table: {e}") from e


def _read_meta(path: Path) -> pl.DataFrame:
    """The metadata table through the project's reader when present (same parsing as `score`)."""
    try:
        from xbmd_batch.metadata import read_table
    except ImportError:  # pragma: no cover - the metadata module is part of the package
        return _read_table(path)
    return read_table(path)


def _find_path_column(df: pl.DataFrame) -> str | None:
    cols = {c.lower(): c for c in df.columns}
    for name in PATH_COLUMNS:
        if name in cols:
            return cols[name]
    for c in df.columns:
        if c.lower().endswith(("_path", "path")):
            return c
    return None


def _discover_dicoms(root: Path) -> list[Path]:
    """Every DICOM under root (by content, not extension), skipping hidden folders such as the cache."""
    from xbmd_batch.dicom_io import is_dicom

    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith(".") or fn.lower().endswith(
                (".csv", ".json", ".parquet", ".md", ".txt", ".npy")
            ):
                continue
            p = Path(dirpath) / fn
            if is_dicom(p):
                out.append(p)
    return out


def _map_by_patient_id(root: Path) -> pl.DataFrame:
    from xbmd_batch.dicom_io import read_header

    rows = []
    for p in _discover_dicoms(root):
        h = read_header(p)
        if h.patient_id:
            rows.append((str(p.resolve()), str(h.patient_id).strip()))
    if not rows:
        raise InputError(f"{root}: no DICOM files with a PatientID found")
    return pl.DataFrame(rows, schema={"path": pl.Utf8, "subject_id": pl.Utf8}, orient="row")


def load_cohort(
    cohort_dir: str | os.PathLike[str],
    meta_path: str | os.PathLike[str] | None = None,
    labels_path: str | os.PathLike[str] | None = None,
    label_col: str = "bmd_dxa",
    schema: MetadataSchema = DEFAULT_SCHEMA,
) -> Cohort:
    """Images + labels + metadata, one row per labelled image, sorted by path.

    Subject <-> file: the truth table's path column when it has one whose files all exist, else the DICOM
    PatientID of every file under the cohort folder. Images without a label are dropped (counted in `notes`);
    a subject without a metadata row keeps its image with every field missing.
    """
    root = Path(cohort_dir).resolve()
    if not root.is_dir():
        raise InputError(f"{root}: cohort folder not found")
    meta_p = Path(meta_path) if meta_path else root / "meta.csv"
    labels_p = Path(labels_path) if labels_path else root / "truth.csv"
    key = schema.subject_key
    labels = _read_table(labels_p)
    if key not in labels.columns:
        raise InputError(f"{labels_p}: no {key!r} column (has {labels.columns})")
    if label_col not in labels.columns:
        raise InputError(f"{labels_p}: no label column {label_col!r} (has {labels.columns})")
    labels = labels.with_columns(pl.col(key).cast(pl.Utf8).str.strip_chars())
    notes: list[str] = []

    mapping = "dicom-patient-id"
    pcol = _find_path_column(labels)
    files: pl.DataFrame | None = None
    if pcol is not None:
        resolved = []
        for rel in labels[pcol].cast(pl.Utf8).to_list():
            cand = [root / str(rel), labels_p.parent / str(rel)] if rel else []
            hit = next((c for c in cand if c.is_file()), None)
            resolved.append(str(hit.resolve()) if hit else None)
        if all(r is not None for r in resolved):
            files = pl.DataFrame({"path": resolved, key: labels[key]})
            mapping = f"truth-path-column:{pcol}"
        else:
            notes.append(f"truth column {pcol!r} names missing files; mapped by DICOM PatientID instead")
    if files is None:
        files = _map_by_patient_id(root).rename({"subject_id": key})

    lab = labels.select(key, pl.col(label_col).cast(pl.Float64).alias("__y")).unique(key, keep="first")
    df = files.unique("path").join(lab, on=key, how="left").sort("path")
    unlabelled = df.filter(pl.col("__y").is_null() | pl.col("__y").is_nan())
    if unlabelled.height:
        notes.append(f"{unlabelled.height} image(s) without a finite {label_col!r} label dropped")
    df = df.filter(pl.col("__y").is_not_null() & pl.col("__y").is_not_nan())
    if df.height == 0:
        raise InputError(f"{root}: no image matches a labelled subject in {labels_p}")
    no_image = set(lab[key].to_list()) - set(df[key].to_list())
    if no_image:
        notes.append(f"{len(no_image)} labelled subject(s) without an image")

    meta = _read_meta(meta_p) if meta_p.is_file() else pl.DataFrame({key: []}, schema={key: pl.Utf8})
    if not meta_p.is_file():
        notes.append(f"{meta_p}: no metadata table; every field is missing")
    if key not in meta.columns:
        raise InputError(f"{meta_p}: no {key!r} column (has {meta.columns})")
    meta = meta.with_columns(pl.col(key).cast(pl.Utf8).str.strip_chars()).unique(key, keep="first")
    cols = [c for c in schema.names if c in meta.columns]
    absent = [c for c in schema.names if c not in meta.columns]
    if absent:
        notes.append(f"metadata table lacks {absent}; treated as missing")
    meta_rows = df.select("path", key).join(meta.select(key, *cols), on=key, how="left").sort("path")
    n_nometa = df.height - df.join(meta.select(key), on=key, how="semi").height
    if n_nometa:
        notes.append(f"{n_nometa} image(s) whose subject has no metadata row (all fields missing)")

    info_p = root / "cohort.json"
    info = json.loads(info_p.read_text()) if info_p.is_file() else None
    return Cohort(
        root=root,
        paths=df["path"].to_list(),
        subject_ids=np.asarray(df[key].to_list(), dtype=object).astype(str),
        y=df["__y"].to_numpy().astype(np.float64),
        meta_df=meta_rows.drop("path"),
        label_col=label_col,
        mapping=mapping,
        cohort_info=info,
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


def _decode_one(job: tuple[int, str, dict[str, Any]]) -> tuple[int, np.ndarray | None, str | None]:
    """Worker: one file -> (index, [1, S, S] float32 or None, error message or None)."""
    from xbmd_batch.preprocess import load_and_preprocess

    i, path, cfg_d = job
    try:
        arr, _info = load_and_preprocess(path, PreprocessConfig.from_dict(cfg_d))
        return i, np.asarray(arr, dtype=np.float32), None
    except Exception as e:  # a bad file must not stop the cohort; it is reported and excluded
        return i, None, f"{type(e).__name__}: {e}"


def build_image_cache(
    paths: Sequence[str],
    cfg: PreprocessConfig,
    cache_dir: str | os.PathLike[str],
    workers: int = 1,
    progress: bool = True,
) -> ImageCache:
    """Return the cached array for (paths, cfg), decoding in a process pool if the key is new.

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
    jobs = [(i, p, cfg.to_dict()) for i, p in enumerate(uniq)]

    def _store(res: tuple[int, np.ndarray | None, str | None]) -> None:
        i, arr, err = res
        if arr is None or arr.shape != (1, s, s):
            errors[uniq[i]] = err or f"unexpected shape {None if arr is None else arr.shape}"
        else:
            out[i] = arr
            ok_u[i] = True

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task(f"decode {len(uniq)} DICOMs -> {s}px", total=len(uniq))
        if workers <= 1 or len(uniq) < 4:
            for job in jobs:
                _store(_decode_one(job))
                bar.advance(task)
        else:
            # forkserver: workers never inherit the parent's torch/OpenMP state
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["xbmd_batch.preprocess"])
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for res in pool.map(_decode_one, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                    _store(res)
                    bar.advance(task)
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
