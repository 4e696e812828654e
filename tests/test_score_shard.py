"""`score --shard K/N` + `merge` equals a single run; merge refuses incomplete or foreign shard sets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from tests.helpers.score import make_model, plant_mismatches
from tests.helpers.uncertainty import simulate_pairs
from xbmd_batch.cli import app
from xbmd_batch.errors import InputError
from xbmd_batch.score import ScoreOptions, score_cohort
from xbmd_batch.score.shard import merge_shards, parse_shard, shard_of

N = 3


def _opts(**kw: object) -> ScoreOptions:
    return ScoreOptions(quiet=True, workers=0, chunk_size=5, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model_with_intervals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with SYNTHETIC out-of-fold residuals in its card: scores get bmd_lo/bmd_hi/p_t_le_*."""
    pred, y = simulate_pairs(np.random.default_rng(0), 300)
    oof = {"prediction": pred.tolist(), "target": y.tolist(), "calibrated": True,
           "reference": "nhanes3-hologic", "n": 300}  # fmt: skip
    return make_model(tmp_path_factory.mktemp("m") / "m.pt", training_summary={"oof_residuals": oof})


@pytest.fixture(scope="module")
def sharded(
    tmp_path_factory: pytest.TempPathFactory, cohort_session: Path, model_with_intervals: Path
) -> dict:
    tiny_model = model_with_intervals
    root = tmp_path_factory.mktemp("shard")
    cohort = root / "cohort"
    shutil.copytree(cohort_session, cohort)
    dicom = plant_mismatches(cohort)
    meta = cohort / "meta.csv"
    single = score_cohort(dicom, meta, tiny_model, root / "single", _opts())
    shards = [
        score_cohort(dicom, meta, tiny_model, root / f"s{k}", _opts(shard=f"{k}/{N}"))
        for k in range(1, N + 1)
    ]
    return {
        "root": root,
        "dicom": dicom,
        "meta": meta,
        "single": single,
        "shards": shards,
        "model": tiny_model,
    }


def test_shards_plus_merge_equal_single_run(sharded: dict) -> None:
    root = sharded["root"]
    assert sharded["single"].exit_code == 3
    res = merge_shards(root / "merged", [root / "s3", root / "s1", root / "s2"])  # order does not matter
    assert res.exit_code == 3
    one, m = root / "single", root / "merged"

    s1, s2 = pl.read_parquet(one / "scores.parquet"), pl.read_parquet(m / "scores.parquet")
    assert s2.columns == s1.columns and s2.height == s1.height > 20
    assert s2["relative_path"].to_list() == s1["relative_path"].to_list()  # same rows, same (plan) order
    np.testing.assert_allclose(s2["bmd_pred"].to_numpy(), s1["bmd_pred"].to_numpy(), atol=1e-5)
    exact = [c for c in s1.columns if c not in ("run_id",) and s1[c].dtype not in (pl.Float32, pl.Float64)]
    assert s2.select(exact).equals(s1.select(exact))
    assert s2["run_id"].n_unique() == 1 and s2["run_id"][0] == res.run_id
    assert s1["bmd_lo"].null_count() == 0  # the interval columns are really there (model card has residuals)
    for c in ("bmd_lo", "bmd_hi"):
        np.testing.assert_allclose(s2[c].to_numpy(), s1[c].to_numpy(), atol=1e-5)

    f1, f2 = pl.read_parquet(one / "failures.parquet"), pl.read_parquet(m / "failures.parquet")
    key = ["relative_path", "meta_row", "stage", "reason"]
    assert f2.select(key).equals(f1.select(key))  # same reason codes, same order
    assert set(f1["reason"]) >= {"duplicate_sop_instance_uid", "no_metadata", "header_unreadable",
                                 "metadata_without_image"}  # fmt: skip
    assert "decode" in set(f1["stage"])

    c1, c2 = (pl.read_parquet(d / "cohort_summary.parquet") for d in (one, m))  # finalize's other table
    assert c2.columns == c1.columns and c2.height == c1.height > 0
    for c in c1.columns:
        if c1[c].dtype in (pl.Float32, pl.Float64):
            np.testing.assert_allclose(c2[c].to_numpy(), c1[c].to_numpy(), atol=1e-5, err_msg=c)
        else:
            assert c2[c].to_list() == c1[c].to_list(), c

    r1, r2 = (json.loads((d / "reconciliation.json").read_text()) for d in (one, m))
    assert r2["counts"] == r1["counts"]
    for name in ("non_dicom_files", "hidden_files", "non_image_dicoms", "metadata_rows_without_images"):
        assert r2[name] == r1[name], name

    run = json.loads((m / "run.json").read_text())
    single_run = json.loads((one / "run.json").read_text())
    assert run["status"] == "complete" and run["merged"]["n_shards"] == N
    assert [s["shard"] for s in run["merged"]["shards"]] == ["1/3", "2/3", "3/3"]
    assert all(s["timings_s"] for s in run["merged"]["shards"])  # per-shard timings kept
    for k in ("scored", "failed_in_scoring", "failures_total", "not_processed", "matched_images"):
        assert run["counts"][k] == single_run["counts"][k], k
    assert run["who_distribution"] == single_run["who_distribution"]


def test_shards_partition_subjects(sharded: dict) -> None:
    root = sharded["root"]
    seen: dict[str, int] = {}
    sizes = []
    for k in (1, 2, 3):
        s = pl.read_parquet(root / f"s{k}" / "scores.parquet")
        sizes.append(s.height)
        for subj in set(s["subject_key"]):
            assert subj not in seen, f"subject {subj} in shards {seen[subj]} and {k}"
            seen[subj] = k
            assert shard_of("s:" + subj, N) == k
    assert all(n > 0 for n in sizes)  # 24+ subjects over 3 shards: none empty
    run = json.loads((root / "s2" / "run.json").read_text())
    assert run["shard"]["k"] == 2 and run["shard"]["n"] == N
    assert json.loads((root / "s2" / "run_state.json").read_text())["shard"] == "2/3"


def test_merge_refuses_missing_and_duplicate_shards(sharded: dict) -> None:
    root = sharded["root"]
    with pytest.raises(InputError, match=r"missing shard\(s\) 2/3"):
        merge_shards(root / "bad1", [root / "s1", root / "s3"])
    with pytest.raises(InputError, match=r"shard 1/3 given 2 times"):
        merge_shards(root / "bad2", [root / "s1", root / "s1", root / "s2", root / "s3"])
    with pytest.raises(InputError, match="not a shard"):
        merge_shards(root / "bad3", [root / "single"])
    assert not any((root / b).exists() for b in ("bad1", "bad2", "bad3"))
    r = CliRunner().invoke(app, ["merge", str(root / "bad4"), str(root / "s1"), str(root / "s2")])
    assert r.exit_code == 2 and "missing shard(s) 3/3" in r.output
    assert not (root / "bad4").exists()


def test_merge_refuses_shard_of_another_model(sharded: dict, tmp_path: Path) -> None:
    root = sharded["root"]
    other = make_model(tmp_path / "other.pt", seed=7)
    score_cohort(sharded["dicom"], sharded["meta"], other, tmp_path / "s3x", _opts(shard=f"3/{N}"))
    with pytest.raises(InputError, match=r"s3x differs .* in model sha256"):
        merge_shards(tmp_path / "m", [root / "s1", root / "s2", tmp_path / "s3x"])
    assert not (tmp_path / "m").exists()


def test_resume_with_another_shard_is_refused(sharded: dict) -> None:
    root = sharded["root"]
    with pytest.raises(InputError, match="--shard differs"):
        score_cohort(sharded["dicom"], sharded["meta"], sharded["model"], root / "s1", _opts(shard="2/3"))


def test_parse_shard_and_stable_hash() -> None:
    assert (parse_shard("2/8").k, parse_shard(" 2 / 8 ").n) == (2, 8)
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(InputError):
            parse_shard(bad)
    # the same shard in another interpreter with another hash seed (Python's hash() would differ)
    code = (
        "from xbmd_batch.score.shard import shard_of; print([shard_of(f's:P{i:04d}', 7) for i in range(50)])"
    )
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
    assert outs == {str([shard_of(f"s:P{i:04d}", 7) for i in range(50)]) + "\n"}
    assert len(set(json.loads(outs.pop()))) == 7  # all shards used
