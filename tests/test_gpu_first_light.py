"""benchmarks/gpu_first_light.sh: it parses, its --dry-run prints the plan and checks the CPU parts, and its
summary attributes GPU samples to the bench call they were taken during. (The GPU run itself is not CI's.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_first_light.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_first_light as fl  # noqa: E402


def _bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_script_parses() -> None:
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_dry_run_prints_plan_and_checks_cpu_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _bash("--dry-run", env={"OUT": str(out), "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    for step in ("facts", "env", "pytest_gpu", "fp16_tests", "cohort", "engines", "bench", "summarize"):
        assert step in r.stdout
    assert "dry-run: OK" in r.stdout
    facts = json.loads((out / "work" / "facts.json").read_text())
    assert facts["python"] and "torch" in facts
    assert json.loads((out / "summary.json").read_text())["bench"] == []  # nothing was benchmarked


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    assert _bash("--frobnicate", env={"OUT": str(tmp_path)}).returncode == 2
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    r = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 2 and "OUT" in r.stderr


def test_summarize_attributes_gpu_samples_to_bench_calls(tmp_path: Path) -> None:
    steps = [
        {"step": "bench_fp16_b32", "status": "ok", "start": 100.0, "end": 110.0, "seconds": 10.0, "note": ""},
        {
            "step": "bench_fp16_b128",
            "status": "ok",
            "start": 120.0,
            "end": 130.0,
            "seconds": 10.0,
            "note": "",
        },
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    util = ["epoch_s,gpu_util_pct,mem_util_pct,mem_used_mib,power_w"]
    util += [f"{t},{10 if t < 115 else 80},5,1000,100" for t in range(95, 135)]
    (tmp_path / "gpu_util.csv").write_text("\n".join(util) + "\n")
    for name, ips in (("fp16_b32", 1000.0), ("fp16_b128", 2000.0)):
        d = tmp_path / "work" / "bench" / name
        d.mkdir(parents=True)
        row = {
            "stage": "model_only",
            "backend": "torch",
            "precision": "fp16",
            "batch_size": 32,
            "items_per_s": ips,
        }
        (d / "bench.json").write_text(json.dumps({"synthetic_cohort": True, "rows": [row]}))
    s = fl.summarize(tmp_path)
    by_call = {r["call"]: r for r in s["bench"]}
    assert by_call["fp16_b32"]["gpu_util_during_call"]["gpu_util_mean_pct"] == 10.0
    assert by_call["fp16_b128"]["gpu_util_during_call"]["gpu_util_max_pct"] == 80.0
    assert by_call["fp16_b32"]["gpu_util_during_call"]["samples"] == 11  # 100..110 inclusive
    md = (tmp_path / "summary.md").read_text()
    assert "SYNTHETIC" in md and "| fp16_b128 | model_only | torch | fp16 |" in md


def test_summarize_reads_the_steady_state_score_runs(tmp_path: Path) -> None:
    """The steady-state step's score runs (work/steady/<prep>_r<round>/run.json) become rows with their
    throughput, where preprocessing finished, the page-locking report and the GPU utilisation of that run."""
    steps = [
        {"step": f"steady_{name}", "status": "ok", "start": t0, "end": t0 + 10.0, "seconds": 10.0, "note": ""}
        for name, t0 in (("cpu_r1", 100.0), ("cuda_r1", 120.0))
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    util = ["epoch_s,gpu_util_pct,mem_util_pct,mem_used_mib,power_w"]
    util += [f"{t},{20 if t < 115 else 60},5,1000,100" for t in range(95, 135)]
    (tmp_path / "gpu_util.csv").write_text("\n".join(util) + "\n")
    upload = {"pinned": True, "bytes": 3 << 30, "registrations": 400, "seconds": 0.8, "failure": None}
    off = {
        **upload,
        "pinned": False,
        "bytes": 0,
        "disabled": "XBMD_PIN_SLOTS=0: uploads from pageable memory",
    }
    runs = (
        ("cpu_r1", 700.0, "cpu", None),
        ("cuda_r1", 900.0, "cuda:0", upload),
        ("cudapageable_r1", 500.0, "cuda:0", off),
    )
    for name, ips, dev, up in runs:
        d = tmp_path / "work" / "steady" / name
        d.mkdir(parents=True)
        run = {
            "status": "complete",
            "counts": {"scored": 1024},
            "throughput": {"images_per_s": ips, "scoring_loop_s": 1024 / ips, "wall_s": 9.0},
            "preprocess": {"device": dev, "reason": "--preprocess-device x", "upload": up},
            "timings_s": {"infer": 0.5, "decode_wait": 0.1, "model_load": 3.0},
        }
        (d / "run.json").write_text(json.dumps(run))
    s = fl.summarize(tmp_path)
    rows = {r["call"]: r for r in s["steady"]}
    assert rows["cpu_r1"]["images_per_s"] == 700.0 and rows["cuda_r1"]["preprocess_device"] == "cuda:0"
    assert rows["cpu_r1"]["gpu_util_during_call"]["gpu_util_mean_pct"] == 20.0
    assert rows["cuda_r1"]["gpu_util_during_call"]["gpu_util_max_pct"] == 60.0
    assert rows["cuda_r1"]["upload"]["registrations"] == 400
    md = (tmp_path / "summary.md").read_text()
    assert "Steady state" in md and "| cuda_r1 | 1024 | 900.0 |" in md and "| 3072 (0.8) |" in md
    assert "| cudapageable_r1 | 1024 | 500.0 |" in md and "| off (pageable) |" in md


def test_dry_run_plans_the_steady_state_step(tmp_path: Path) -> None:
    r = _bash("--dry-run", env={"OUT": str(tmp_path / "o"), "PYTHON": sys.executable, "STEADY_N": "64"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "steady" in r.stdout and "64 SYNTHETIC subjects" in r.stdout
    assert "--preprocess-device cpu, then cuda" in r.stdout and "XBMD_PIN_SLOTS=0" in r.stdout


@pytest.mark.gpu
def test_sample_gpu_reads_the_device(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    p = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_first_light.py"),
            "sample-gpu",
            str(tmp_path / "u.csv"),
            "--interval",
            "0.05",
        ]
    )
    try:
        p.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass
    finally:
        p.kill()
    rows = fl._read_util(tmp_path / "u.csv")
    assert rows and 0 <= rows[0]["gpu_util_pct"] <= 100
