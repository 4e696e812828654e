"""`score --engine ray` (one local Ray runtime, 2 CPUs, no GPU) writes the local engine's tables.

One module-scoped Ray runtime (start-up is paid once) and one planted cohort (every bucket of the plan, a
decode failure among them) scored by both engines; then a partial resume on Ray whose first model actor dies
on its first batch (the ``KILL_ACTOR_ONCE_ENV`` hook): Ray restarts it and retries the batch, and no row is
written twice. Skipped with a reason when Ray is not installed (CI installs the `ray` extra: `make test`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from tests.helpers.score import plant_mismatches
from xbmd_batch.cli import app
from xbmd_batch.errors import InputError, exit_code
from xbmd_batch.score import ScoreOptions, score_cohort
from xbmd_batch.score.ray_engine import KILL_ACTOR_ONCE_ENV, KILL_DECODE_ONCE_ENV, n_actors
from xbmd_batch.score.writer import list_parts

COUNTS = ("scored", "failed_in_scoring", "failures_total", "not_processed", "matched_images")


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'xbmd-batch[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(
    ray_runtime, tmp_path_factory: pytest.TempPathFactory, cohort_session: Path, tiny_model: Path
) -> dict:
    root = tmp_path_factory.mktemp("ray")
    shutil.copytree(cohort_session, root / "cohort")
    dicom, meta = plant_mismatches(root / "cohort"), root / "cohort" / "meta.csv"
    local = score_cohort(dicom, meta, tiny_model, root / "local", ScoreOptions(quiet=True, workers=0))
    opts = ScoreOptions(quiet=True, engine="ray", chunk_size=7, batch_size=4)
    on_ray = score_cohort(dicom, meta, tiny_model, root / "ray", opts)
    return {"root": root, "dicom": dicom, "meta": meta, "model": tiny_model, "opts": opts,
            "local": local, "ray": on_ray}  # fmt: skip


def _assert_same_tables(a: Path, b: Path) -> None:
    s1, s2 = pl.read_parquet(a / "scores.parquet"), pl.read_parquet(b / "scores.parquet")
    assert s2.columns == s1.columns and s2.height == s1.height > 20
    assert s2["relative_path"].to_list() == s1["relative_path"].to_list()  # same rows, same order
    for c in s1.columns:
        if s1[c].dtype in (pl.Float32, pl.Float64):
            np.testing.assert_allclose(s2[c].to_numpy(), s1[c].to_numpy(), atol=1e-5, err_msg=c)
    exact = [c for c in s1.columns if c != "run_id" and s1[c].dtype not in (pl.Float32, pl.Float64)]
    assert s2.select(exact).equals(s1.select(exact))  # backend, precision, WHO class, flags, ids...
    f1, f2 = pl.read_parquet(a / "failures.parquet"), pl.read_parquet(b / "failures.parquet")
    key = ["relative_path", "meta_row", "stage", "reason"]
    assert f2.select(key).equals(f1.select(key))
    r1, r2 = (json.loads((d / "reconciliation.json").read_text()) for d in (a, b))
    assert r2["counts"] == r1["counts"]
    j1, j2 = (json.loads((d / "run.json").read_text()) for d in (a, b))
    assert {k: j2["counts"][k] for k in COUNTS} == {k: j1["counts"][k] for k in COUNTS}
    assert j2["status"] == j1["status"] == "complete" and j2["backend"] == j1["backend"] == "torch"


def test_ray_engine_equals_local(runs: dict) -> None:
    root, local, on_ray = runs["root"], runs["local"], runs["ray"]
    assert on_ray.exit_code == local.exit_code == 3  # quarantined inputs, as locally
    assert {k: on_ray.counts[k] for k in COUNTS} == {k: local.counts[k] for k in COUNTS}
    assert (on_ray.backend, on_ray.precision) == (local.backend, local.precision)
    _assert_same_tables(root / "local", root / "ray")
    failures = pl.read_parquet(root / "ray" / "failures.parquet")
    assert "decode" in set(failures["stage"])  # the truncated file failed in a Ray decode task, as locally
    run = json.loads((root / "ray" / "run.json").read_text())
    assert run["options"]["engine"] == "ray" and run["ray"]["started"] and run["ray"]["actors"] == 1
    assert run["runner"]["backend"] == "torch" and run["counts"]["parts_written_this_session"] >= 2
    assert run["counts"]["scored_this_session"] == local.counts["scored"]


def test_resume_on_ray_rescores_nothing(runs: dict) -> None:
    root = runs["root"]
    before = pl.read_parquet(root / "ray" / "scores.parquet")
    n_parts = len(list_parts(root / "ray"))
    again = score_cohort(runs["dicom"], runs["meta"], runs["model"], root / "ray", runs["opts"])
    assert again.exit_code == 3 and again.resumed
    assert again.counts["scored_this_session"] == 0 and again.counts["failed_this_session"] == 0
    assert len(list_parts(root / "ray")) == n_parts
    after = pl.read_parquet(root / "ray" / "scores.parquet")
    assert after.drop("run_id").equals(before.drop("run_id"))


def test_killed_actor_and_decode_worker_are_retried_without_duplicates(
    runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial resume on Ray (half the parts removed) whose model actor dies on its first batch and whose
    decode worker dies on its first batch (that batch is then decoded file by file by a local DecodePool)."""
    root = runs["root"]
    out = tmp_path / "resumed"
    shutil.copytree(root / "ray", out)
    parts = list_parts(out)
    removed = sum(pl.read_parquet(p).height for p in parts[::2])
    for p in parts[::2]:
        p.unlink()
    markers = tmp_path / "actor-killed", tmp_path / "decode-killed"
    monkeypatch.setenv(KILL_ACTOR_ONCE_ENV, str(markers[0]))
    monkeypatch.setenv(KILL_DECODE_ONCE_ENV, str(markers[1]))
    res = score_cohort(runs["dicom"], runs["meta"], runs["model"], out, runs["opts"])
    assert all(m.exists() for m in markers)  # the hooks fired: an actor and a decode worker died mid-run
    assert json.loads((out / "run.json").read_text())["ray"]["decode_batches_redone_file_by_file"] >= 1
    assert res.exit_code == 3
    assert res.counts["scored_this_session"] + res.counts["failed_this_session"] == removed
    rows = pl.concat([pl.read_parquet(p) for p in list_parts(out)], how="vertical_relaxed")
    key = rows.select("relative_path", "sop_instance_uid")
    assert key.n_unique() == rows.height  # no row written twice
    _assert_same_tables(root / "local", out)


def test_shard_on_ray_equals_local_shard(runs: dict) -> None:
    """`score --engine ray --ray-actors 1 --shard 2/3` (through the CLI): the shard's slice of the plan,
    scored on Ray, equals the local shard."""
    root, args = runs["root"], (runs["dicom"], runs["meta"], runs["model"])
    local = score_cohort(*args, root / "local-s2", ScoreOptions(quiet=True, workers=0, shard="2/3"))
    cli = [
        "score",
        str(runs["dicom"]),
        str(runs["meta"]),
        "-m",
        str(runs["model"]),
        "-o",
        str(root / "ray-s2"),
    ]
    r = CliRunner().invoke(app, [*cli, "--engine", "ray", "--ray-actors", "1", "--shard", "2/3", "--quiet"])
    assert r.exit_code == local.exit_code, r.output
    run = json.loads((root / "ray-s2" / "run.json").read_text())
    assert run["options"]["engine"] == "ray" and run["ray"]["actors"] == 1
    s1, s2 = (pl.read_parquet(root / d / "scores.parquet") for d in ("local-s2", "ray-s2"))
    assert 0 < s2.height < pl.read_parquet(root / "local" / "scores.parquet").height
    assert s2["relative_path"].to_list() == s1["relative_path"].to_list()
    np.testing.assert_allclose(s2["bmd_pred"].to_numpy(), s1["bmd_pred"].to_numpy(), atol=1e-5)
    assert json.loads((root / "ray-s2" / "run.json").read_text())["shard"]["k"] == 2


def test_ray_options_refused_without_ray_engine(tmp_path: Path, cohort: Path, tiny_model: Path) -> None:
    with pytest.raises(InputError, match="need --engine ray"):
        score_cohort(cohort / "dicom", cohort / "meta.csv", tiny_model, tmp_path / "o",
                     ScoreOptions(quiet=True, ray_address="auto"))  # fmt: skip
    args = ["score", str(cohort / "dicom"), str(cohort / "meta.csv"), "-m", str(tiny_model)]
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o"), "--engine", "spark"])
    assert r.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_actor_sizing_rule() -> None:
    """One actor per GPU; without GPUs one per 4 CPUs, and never so many that decode gets no CPU."""
    assert n_actors({"CPU": 16.0, "GPU": 4.0}, None) == (4, 1)
    assert n_actors({"CPU": 16.0}, None) == (4, 0)
    assert n_actors({"CPU": 2.0}, None) == (1, 0)
    assert n_actors({"CPU": 8.0}, 3) == (3, 0)
    with pytest.raises(InputError, match="use --ray-actors 1 or fewer"):
        n_actors({"CPU": 2.0}, 2)
    with pytest.raises(InputError, match="needs at least 2"):
        n_actors({"CPU": 1.0}, None)


def test_runner_that_cannot_open_fails_as_locally(runs: dict, tmp_path: Path) -> None:
    """The actors' open_runner error reaches the caller as the project error it is (same exit code)."""
    args = (runs["dicom"], runs["meta"], runs["model"])
    errors = []
    for name, kw in (("local", {"workers": 0}), ("ray", {"engine": "ray"})):
        with pytest.raises(Exception) as e:
            score_cohort(*args, tmp_path / name, ScoreOptions(quiet=True, backend="tensorrt", **kw))
        errors.append(e.value)
    assert type(errors[1]) is type(errors[0]) and str(errors[1]) == str(errors[0])
    assert exit_code(errors[1]) == exit_code(errors[0]) is not None
    assert not (tmp_path / "ray" / "run_state.json").exists()  # not pinned: the run never started
