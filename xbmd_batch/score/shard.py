"""`score --shard K/N` and `merge`: split one cohort over a job array, then rebuild the single-run tables.

Every shard builds the WHOLE plan (discover -> headers -> join -> reconcile; header reads only, no pixels), so
quarantine decisions that look across files (duplicate SOPInstanceUIDs, several images per subject) are the
same as in a single run. Then each shard keeps only what it owns:

* an image, or a failure row of an image, with a subject key: shard ``1 + blake2b(key) mod N`` (all images of
  a subject land in one shard, whatever the file order or listing);
* a file with no subject key (header errors, non-DICOM, hidden, unreadable files):
  ``1 + blake2b(path) mod N``;
* META-level items (rows without an image, duplicate keys, invalid/derived values, the META row count):
  shard 1.

So the shards' reconciliation counts add up to the single run's. Each shard saves its slice of the plan
(output-form keys with their index in the whole plan) under ``OUT/shard/``; `merge` checks the shards belong
together and re-runs the same `finalize` over the union of their parts, in whole-plan order.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from xbmd_batch.errors import InputError
from xbmd_batch.fsutil import atomic_write_json, atomic_write_parquet, now_iso
from xbmd_batch.score import manifest
from xbmd_batch.score.reconcile import FAILURE_SCHEMA, Plan

SHARD_DIR = "shard"
_SPEC_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
# Options that change only speed, never a row: shards may differ in them (nodes of different sizes).
PERF_ONLY_OPTIONS = frozenset(
    {
        "workers",
        "chunk_size",
        "quiet",
        "task_size",
        "max_inflight",
        "header_threads",
        "batch_size",
        "shard",
        "engine_cache",
        "engine",  # --engine ray runs the local engine's functions: same rows
        "ray_address",
        "ray_actors",
    }
)
_META_LEVEL_COUNTS = (
    "metadata_rows",
    "metadata_duplicate_keys",
    "metadata_invalid_values",
    "metadata_derived_values",
)
_META_LEVEL_LISTS = ("metadata_rows_without_images", "metadata_duplicate_keys", "metadata_invalid_values")
_FILE_LISTS = ("non_dicom_files", "hidden_files", "non_image_dicoms")


@dataclass(frozen=True)
class ShardSpec:
    k: int  # 1-based
    n: int

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


def parse_shard(text: str) -> ShardSpec:
    m = _SPEC_RE.match(text or "")
    if not m:
        raise InputError(f"--shard {text!r}: expected K/N, e.g. 2/8 (K from 1 to N)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise InputError(f"--shard {text!r}: K must be between 1 and N (N >= 1)")
    return ShardSpec(k, n)


def shard_of(key: str, n: int) -> int:
    """1-based shard of a subject key or path: stable across machines and Python runs (never hash())."""
    h = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return 1 + int.from_bytes(h, "big") % n


def _owner(subject: str | None, rel: str | None, n: int) -> int:
    if subject is not None:
        return shard_of("s:" + subject, n)
    if rel is not None:
        return shard_of("p:" + rel, n)
    return 1  # META-level


def restrict_plan(plan: Plan, spec: ShardSpec) -> tuple[Plan, dict[str, Any]]:
    """What shard ``spec`` owns of ``plan``, its counts, and where each kept row sits in the whole plan."""
    n = spec.n
    it, q = plan.items, plan.quarantine

    def owners(df: pl.DataFrame) -> list[int]:
        subj, rel = df.get_column("subject_key").to_list(), df.get_column("relative_path").to_list()
        return [_owner(s, r, n) for s, r in zip(subj, rel, strict=True)]

    item_owner, q_owner = owners(it), owners(q)
    item_idx = (
        np.flatnonzero(np.asarray(item_owner, dtype=np.int64) == spec.k) if item_owner else np.zeros(0, int)
    )
    q_idx = np.flatnonzero(np.asarray(q_owner, dtype=np.int64) == spec.k) if q_owner else np.zeros(0, int)
    items = it[item_idx.tolist()] if len(item_idx) else it.clear()
    quar = q[q_idx.tolist()] if len(q_idx) else q.clear()

    listed: dict[str, Any] = {}
    for name in _FILE_LISTS:
        listed[name] = [r for r in plan.listed.get(name, []) if _owner(None, r, n) == spec.k]
    for name in _META_LEVEL_LISTS:
        listed[name] = list(plan.listed.get(name, [])) if spec.k == 1 else []

    reasons = quar.get_column("reason").to_list()
    stages = quar.get_column("stage").to_list()
    rels = quar.get_column("relative_path").to_list()

    def n_reason(reason: str) -> int:
        return sum(r == reason for r in reasons)

    subj_sizes = items.group_by("subject_key").len().get_column("len").to_list() if items.height else []
    multi = [s for s in subj_sizes if s > 1]
    n_file_fails = sum(
        st in ("header", "reconcile", "join") and rel is not None
        for st, rel in zip(stages, rels, strict=True)
    )
    c = dict(plan.counts)
    c.update(
        hidden_files=len(listed["hidden_files"]),
        non_dicom_files=len(listed["non_dicom_files"]),
        unreadable_files=n_reason("unreadable_file"),
        non_image_dicoms=len(listed["non_image_dicoms"]),
        header_errors=sum(
            r == "header_unreadable" and s == "header" for r, s in zip(reasons, stages, strict=True)
        ),
        duplicate_sop_instance_uids=n_reason("duplicate_sop_instance_uid"),
        images_without_metadata=n_reason("no_metadata"),
        images_without_subject_key=n_reason("no_subject_key"),
        images_with_ambiguous_metadata=n_reason("ambiguous_metadata"),
        matched_images=items.height,
        matched_subjects=len(subj_sizes),
        subjects_with_several_images=len(multi),
        images_of_subjects_with_several=sum(multi),
        metadata_rows_without_images=n_reason("metadata_without_image"),
        quarantined_before_scoring=quar.height,
    )
    c["dicom_files"] = c["non_image_dicoms"] + n_file_fails + items.height
    c["files_seen"] = c["dicom_files"] + c["hidden_files"] + c["non_dicom_files"] + c["unreadable_files"]
    if spec.k != 1:
        for name in _META_LEVEL_COUNTS:
            c[name] = 0
    info = {
        "k": spec.k,
        "n": spec.n,
        "rule": "blake2b-64(subject key, else path) mod N; META-level items in shard 1",
        "plan_items_total": it.height,
        "plan_quarantine_total": q.height,
        "item_index": item_idx.astype(np.int64),
        "quarantine_index": q_idx.astype(np.int64),
    }
    return Plan(items=items, quarantine=quar, counts=c, listed=listed), info


def manifest_entry(info: dict[str, Any]) -> dict[str, Any]:
    """What run.json / run_state.json record about the shard (no index arrays)."""
    return {k: v for k, v in info.items() if not k.endswith("_index")}


def save_slice(
    out_dir: Path,
    plan_keys: pl.DataFrame,
    quarantine: pl.DataFrame,
    info: dict[str, Any],
    strata: pl.DataFrame | None = None,
) -> None:
    """OUT/shard/{plan_keys,quarantine}.parquet: this shard's rows (output form) + their whole-plan index;
    strata.parquet: the META-level cohort-summary groups (finalize's ``strata``): merge needs no META."""
    d = Path(out_dir) / SHARD_DIR
    d.mkdir(exist_ok=True)
    pk = plan_keys.with_columns(pl.Series("plan_index", info["item_index"], pl.Int64))
    qq = quarantine.cast(FAILURE_SCHEMA).with_columns(
        pl.Series("plan_index", info["quarantine_index"], pl.Int64)
    )
    atomic_write_parquet(d / "plan_keys.parquet", pk.to_arrow())
    atomic_write_parquet(d / "quarantine.parquet", qq.to_arrow())
    if strata is not None:
        atomic_write_parquet(d / "strata.parquet", strata.to_arrow())


# ----------------------------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    exit_code: int
    out_dir: Path
    counts: dict[str, int]
    run_id: str


def _load_shard(d: Path) -> dict[str, Any]:
    d = Path(d)
    rj = d / "run.json"
    if not rj.is_file():
        raise InputError(f"{d}: no run.json (not a finished xbmd-batch score run)")
    try:
        run = json.loads(rj.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{rj}: unreadable ({e})") from e
    if run.get("format") != "xbmd-batch-run":
        raise InputError(f"{rj}: not an xbmd-batch run")
    if not run.get("shard"):
        raise InputError(f"{d}: not a shard (it was scored without --shard)")
    if run.get("status") != "complete":
        raise InputError(
            f"{d}: shard {run['shard'].get('k')}/{run['shard'].get('n')} has status {run.get('status')!r}; "
            "rerun its score command to finish it (it resumes) before merging"
        )
    for f in ("plan_keys.parquet", "quarantine.parquet"):
        if not (d / SHARD_DIR / f).is_file():
            raise InputError(f"{d}: {SHARD_DIR}/{f} is missing")
    recon = d / "reconciliation.json"
    if not recon.is_file():
        raise InputError(f"{d}: reconciliation.json is missing")
    return {"dir": d, "run": run, "recon": json.loads(recon.read_text())}


def _identity(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "model sha256": run["model"]["sha256"],
        "META sha256": run["inputs"]["meta_sha256"],
        "pseudonym key": run.get("pseudonym_key_fingerprint"),
        "N": run["shard"]["n"],
        "whole-plan size": (run["shard"]["plan_items_total"], run["shard"]["plan_quarantine_total"]),
        **{f"option {k}": v for k, v in sorted(run["options"].items()) if k not in PERF_ONLY_OPTIONS},
    }


def check_shards(shards: list[dict[str, Any]]) -> None:
    """Refuse (InputError naming the shards) unless the shards are one complete, consistent set."""
    if not shards:
        raise InputError("merge: no shard folders given")
    ref = _identity(shards[0]["run"])
    bad: list[str] = []
    for s in shards[1:]:
        ident = _identity(s["run"])
        for k, v in ref.items():
            if ident.get(k) != v:
                bad.append(f"{s['dir']} differs from {shards[0]['dir']} in {k}: {ident.get(k)!r} != {v!r}")
        for k in ident.keys() - ref.keys():
            bad.append(f"{s['dir']} differs from {shards[0]['dir']} in {k}")
    if bad:
        raise InputError("merge: shards do not belong together:\n  " + "\n  ".join(bad))
    n = int(ref["N"])
    by_k: dict[int, list[str]] = {}
    for s in shards:
        by_k.setdefault(int(s["run"]["shard"]["k"]), []).append(str(s["dir"]))
    dup = {k: v for k, v in by_k.items() if len(v) > 1}
    missing = [k for k in range(1, n + 1) if k not in by_k]
    msgs = []
    if missing:
        msgs.append(f"missing shard(s) {', '.join(f'{k}/{n}' for k in missing)}")
    if dup:
        msgs.extend(f"shard {k}/{n} given {len(v)} times: {', '.join(v)}" for k, v in sorted(dup.items()))
    if msgs:
        raise InputError("merge: " + "; ".join(msgs))


def _conformal(run: dict[str, Any]) -> Any:
    """The model card's interval model, read again from the shards' model file (sha256 checked)."""
    if not (run.get("uncertainty") or {}).get("available"):
        return None
    from xbmd_batch.fsutil import sha256_file
    from xbmd_batch.infer.model_file import open_model
    from xbmd_batch.uncertainty import ConditionalConformal

    path = Path(run["model"]["path"])
    if not path.is_file() or sha256_file(path) != run["model"]["sha256"]:
        raise InputError(
            f"merge: the shards' model file {path} is missing or changed (sha256 differs); its card holds "
            "the interval model that scores.parquet's bmd_lo/bmd_hi need"
        )
    return ConditionalConformal.from_training_summary(open_model(path).card.training_summary)[0]


def _merged_lists(recons: list[dict[str, Any]], pseudonymized: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FILE_LISTS:
        v = [x for r in recons for x in r.get(name, [])]
        out[name] = v if pseudonymized else sorted(v)
    for name in _META_LEVEL_LISTS:
        out[name] = [x for r in recons for x in r.get(name, [])]
    return out


def _sum_counts(dicts: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def merge_shards(out_dir: Path, shard_dirs: list[Path]) -> MergeResult:
    """Check the shards, then write OUT/{scores,failures}.parquet, reconciliation.json, run.json."""
    from xbmd_batch.clinical import WHO_CLASSES
    from xbmd_batch.score.finalize import finalize
    from xbmd_batch.score.writer import list_parts

    out_dir = Path(out_dir)
    shards = [_load_shard(Path(d)) for d in shard_dirs]
    check_shards(shards)
    out_r = out_dir.resolve()
    for s in shards:
        if out_r == s["dir"].resolve() or s["dir"].resolve() in out_r.parents:
            raise InputError(f"merge: OUT {out_dir} is (inside) shard folder {s['dir']}; choose another")
    if out_r.exists() and (not out_r.is_dir() or any(out_r.iterdir())):
        raise InputError(f"merge: OUT {out_dir} exists and is not an empty folder")
    shards.sort(key=lambda s: int(s["run"]["shard"]["k"]))
    first = shards[0]["run"]
    keys = pl.concat([pl.read_parquet(s["dir"] / SHARD_DIR / "plan_keys.parquet") for s in shards])
    quar = pl.concat([pl.read_parquet(s["dir"] / SHARD_DIR / "quarantine.parquet") for s in shards])
    total_items, total_q = first["shard"]["plan_items_total"], first["shard"]["plan_quarantine_total"]
    if sorted(keys.get_column("plan_index").to_list()) != list(range(total_items)) or sorted(
        quar.get_column("plan_index").to_list()
    ) != list(range(total_q)):
        raise InputError(
            "merge: the shards' plan slices do not tile the whole plan (the cohort folder changed between "
            "shards?); rerun the shards on an unchanging cohort"
        )
    keys = keys.sort("plan_index").drop("plan_index")
    quar = quar.sort("plan_index").drop("plan_index")
    parts = [p for s in shards for p in list_parts(s["dir"])]
    run_id = (
        "m"
        + hashlib.blake2b("/".join(s["run"]["run_id"] for s in shards).encode(), digest_size=8).hexdigest()[
            :15
        ]
    )
    fields = tuple(first["model"]["fields"])
    reference = first["options"]["reference"]
    conformal = _conformal(first)
    strata_p = shards[0]["dir"] / SHARD_DIR / "strata.parquet"
    strata = pl.read_parquet(strata_p) if strata_p.is_file() else None
    out_r.mkdir(parents=True, exist_ok=True)
    fin = finalize(
        out_dir, keys, quar, fields, reference, first["model"]["sha256"], run_id, part_files=parts,
        conformal=conformal, interval=first["options"].get("interval", 0.9), strata=strata,
    )  # fmt: skip

    recon_counts = _sum_counts([s["recon"]["counts"] for s in shards])
    pseudonymized = bool(first.get("pseudonymized"))
    recon = {
        "run_id": run_id,
        "created": now_iso(),
        "join": shards[0]["recon"].get("join"),
        "pseudonymized": pseudonymized,
        "counts": recon_counts,
        **_merged_lists([s["recon"] for s in shards], pseudonymized),
        "metadata_warnings": shards[0]["recon"].get("metadata_warnings", []),
        # whole-cohort facts every shard computed alike (before keeping its own slice)
        "metadata_table": shards[0]["recon"].get("metadata_table"),
        "metadata_missingness": shards[0]["recon"].get("metadata_missingness", []),
        "merged_from_shards": [
            {"shard": f"{s['run']['shard']['k']}/{s['run']['shard']['n']}", "run_id": s["run"]["run_id"]}
            for s in shards
        ],  # fmt: skip
    }
    atomic_write_json(out_dir / "reconciliation.json", recon)

    scores = pl.read_parquet(out_dir / "scores.parquet", columns=["who_class"])
    who = {c: int((scores.get_column("who_class") == c).sum()) for c in WHO_CLASSES}
    n_fail = pl.read_parquet(out_dir / "failures.parquet", columns=["stage"]).height
    counts = {
        **recon_counts,
        "scored": fin["scored"],
        "failed_in_scoring": fin["failed_in_scoring"],
        "failures_total": n_fail,
        "not_processed": fin["not_processed"],
    }
    timings = _sum_counts([s["run"].get("timings_s", {}) for s in shards])
    run = {
        **{k: v for k, v in first.items() if k not in ("shard", "runner", "machine", "throughput")},
        "run_id": run_id,
        "created": now_iso(),
        "finished": now_iso(),
        "resumed": False,
        "status": "complete" if fin["not_processed"] == 0 else "incomplete",
        "options": {k: v for k, v in first["options"].items() if k not in PERF_ONLY_OPTIONS},
        "reconciliation": recon_counts,
        "counts": counts,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},  # summed over shards (compute-seconds)
        "stage_shares": manifest.stage_shares(timings),
        "who_distribution": who,
        "versions": manifest.versions(),
        "merged": {
            "n_shards": len(shards),
            "rule": first["shard"]["rule"],
            "shards": [
                {
                    "shard": f"{s['run']['shard']['k']}/{s['run']['shard']['n']}",
                    "dir": str(s["dir"].resolve()),
                    "run_id": s["run"]["run_id"],
                    "backend": s["run"].get("backend"),
                    "precision": s["run"].get("precision"),
                    "timings_s": s["run"].get("timings_s"),
                    "throughput": s["run"].get("throughput"),
                    "machine": s["run"].get("machine"),
                    "counts": s["run"].get("counts"),
                }
                for s in shards
            ],
        },
    }
    manifest.write_run_json(out_dir, run)
    code = 3 if (n_fail or fin["not_processed"]) else 0
    return MergeResult(code, out_dir, counts, run_id)
