"""Main-process peak RSS of `xbmd-batch score` and whether torch was imported (issue 11 start-up item).

Not a test. Runs the CLI as a user does (``python -X importtime -m xbmd_batch score DIR META --model M``),
samples the main process's RSS every 0.1 s with psutil, and reads the import-time log to see whether torch
was imported (the onnxruntime / TensorRT paths should not). Target on the onnxruntime path: <= 500 MB.

Run:  .venv/bin/python benchmarks/score_rss.py DIR META MODEL [--out /tmp/xbmd_rss] [-b 16]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_sampling_rss  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dicom_dir", type=Path)
    p.add_argument("meta", type=Path)
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, default=Path("/tmp/xbmd_rss"))
    p.add_argument("-b", "--batch-size", type=int, default=16)
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    import os

    shutil.rmtree(args.out, ignore_errors=True)
    cmd = [sys.executable, "-X", "importtime", "-m", "xbmd_batch", "score", str(args.dicom_dir),
           str(args.meta), "--model", str(args.model), "--out", str(args.out), "--quiet",
           "-b", str(args.batch_size)]  # fmt: skip
    ran = run_sampling_rss(cmd)
    run = json.loads((args.out / "run.json").read_text())
    err = ran.stderr.decode()
    res = {
        "exit_code": ran.returncode,
        "wall_s": round(ran.wall_s, 1),
        "peak_rss_main_mb": round(ran.peak_rss_main / 2**20, 1),
        "torch_imported": any(re.search(r"\|\s+torch$", line.rstrip()) for line in err.splitlines()),
        "scored": run["counts"]["scored"],
        "loop_images_per_s": run["throughput"]["images_per_s"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main(get_args_parser().parse_args())
