"""Fuzz the reader path (sniff -> header -> decode -> preprocess) with hypothesis over mutated DICOM bytes.

Run (long): ``nice -n 10 .venv/bin/python benchmarks/fuzz_reader.py --iterations 100000 --seed 0
--out benchmarks/results/fuzz_reader.json``. The CI test (tests/test_fuzz_reader.py) runs a few hundred.

A child process does the work under an address-space limit (``--mem-gb``, so an unbounded allocation fails
instead of swapping the machine) with a per-file alarm (``--timeout-s``); before each example it saves the
bytes to ``current.bin``. The parent watches: if the child dies (segfault, OOM kill) or stops reporting
progress (a hang inside C code that no alarm interrupts), the saved example is kept under ``--crash-dir``,
counted, and a new child continues with the next seed. Outcomes: see tests/helpers/fuzz_dicom.py. The
report lists counts per outcome, escapes (exceptions that got past the pipeline's own handlers), timeouts,
crashes, iterations and wall time. Not a test: the wall time depends on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _child(args: argparse.Namespace) -> int:
    import resource
    import warnings

    from hypothesis import HealthCheck, Phase, given, settings

    from tests.helpers import fuzz_dicom as fz
    from xbmd_batch.score.privacy import silence_dicom_warnings

    if args.mem_gb > 0:
        lim = int(args.mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    silence_dicom_warnings()
    warnings.simplefilter("ignore")
    state = Path(args.state)
    work = Path(tempfile.mkdtemp(dir=fz.scratch_dir(), prefix="xbmd-fuzz-"))
    counts: Counter[str] = Counter()
    escapes: list[dict[str, str]] = []
    fz.seeds()  # build seeds before the clock matters
    n = {"i": 0}
    t0 = time.perf_counter()

    def flush() -> None:
        tmp = state / "progress.json.tmp"
        tmp.write_text(json.dumps({"done": n["i"], "counts": counts, "escapes": escapes,
                                   "seconds": time.perf_counter() - t0}))  # fmt: skip
        os.replace(tmp, state / "progress.json")

    @settings(max_examples=args.iterations, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(fz.mutated_dicom())
    def run(example: tuple[str, bytes]) -> None:
        desc, data = example
        (state / "current.bin").write_bytes(data)
        (state / "current.txt").write_text(desc)
        f = work / "x.dcm"
        f.write_bytes(data)
        try:
            out = fz.reader_path(f, timeout_s=args.timeout_s)
        except fz.FuzzTimeout:
            out = "timeout"
        except BaseException as e:  # noqa: BLE001 - the point: nothing may escape the pipeline's handlers
            if isinstance(e, KeyboardInterrupt):
                raise
            out = f"escape:{type(e).__name__}"
        if not fz.is_allowed(out):
            keep = Path(args.crash_dir) / f"{out.replace(':', '_')}-{n['i']}.dcm"
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_bytes(data)
            escapes.append({"outcome": out, "example": desc, "saved": str(keep)})
        counts[out] += 1
        n["i"] += 1
        if n["i"] % 200 == 0:
            flush()

    import random

    random.seed(args.seed)  # hypothesis draws from the global random when not derandomised
    try:
        run()
    except KeyboardInterrupt:  # the parent's --max-seconds deadline
        pass
    flush()
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=10.0, help="per-file alarm")
    ap.add_argument("--stall-s", type=float, default=120.0, help="no progress for this long = a hang")
    ap.add_argument("--mem-gb", type=float, default=4.0, help="address-space limit of the child (0: none)")
    ap.add_argument("--crash-dir", default=str(Path(tempfile.gettempdir()) / "xbmd-fuzz-crashes"))
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop (and report) after this long")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--state", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    t0 = time.perf_counter()
    total: Counter[str] = Counter()
    escapes: list[dict[str, str]] = []
    crashes: list[dict[str, object]] = []
    done, seed, children = 0, args.seed, 0
    deadline = time.monotonic() + args.max_seconds if args.max_seconds > 0 else float("inf")
    stopped_early = False
    while done < args.iterations and not stopped_early:
        state = Path(tempfile.mkdtemp(prefix="xbmd-fuzz-state-"))
        cmd = [sys.executable, __file__, "--child", "--state", str(state), "--iterations",
               str(args.iterations - done), "--seed", str(seed), "--timeout-s", str(args.timeout_s),
               "--mem-gb", str(args.mem_gb), "--crash-dir", args.crash_dir]  # fmt: skip
        proc = subprocess.Popen(cmd)
        children += 1
        last, last_t = -1, time.monotonic()
        while proc.poll() is None:
            time.sleep(1.0)
            if time.monotonic() > deadline:
                stopped_early = True
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                break
            p = state / "progress.json"
            cur = json.loads(p.read_text())["done"] if p.exists() else 0
            if cur != last:
                last, last_t = cur, time.monotonic()
            elif time.monotonic() - last_t > args.stall_s:
                proc.kill()
                proc.wait()
                break
        prog = json.loads((state / "progress.json").read_text()) if (state / "progress.json").exists() else {}
        got = int(prog.get("done", 0))
        total.update(prog.get("counts", {}))
        escapes.extend(prog.get("escapes", []))
        if (
            proc.returncode != 0 and not stopped_early
        ):  # died or was killed: the example in current.bin is the culprit
            keep = Path(args.crash_dir) / f"crash-rc{proc.returncode}-{done + got}.dcm"
            keep.parent.mkdir(parents=True, exist_ok=True)
            if (state / "current.bin").exists():
                shutil.copyfile(state / "current.bin", keep)
            desc = (state / "current.txt").read_text() if (state / "current.txt").exists() else ""
            crashes.append({"returncode": proc.returncode, "example": desc, "saved": str(keep)})
            total["crash_or_hang"] += 1
            got += 1  # progress.json lags by < 200: those examples are re-drawn by the next child
        done += max(got, 1)
        seed += 1
        print(f"[fuzz] child {children} ended rc={proc.returncode}: {done} examples so far, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        shutil.rmtree(state, ignore_errors=True)
    wall = time.perf_counter() - t0
    report = {
        "iterations": sum(total.values()),
        "outcomes": dict(total.most_common()),
        "escapes_or_timeouts": escapes,
        "crashes_or_hangs": crashes,
        "children": children,
        "stopped_by_max_seconds": stopped_early,
        "wall_s": round(wall, 1),
        "per_file_timeout_s": args.timeout_s,
        "mem_limit_gb": args.mem_gb,
        "seed": args.seed,
        "load_avg": os.getloadavg(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if not escapes and not crashes else 1


if __name__ == "__main__":
    raise SystemExit(main())
