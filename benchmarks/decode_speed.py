"""Decode speed: uncompressed, RLE, JPEG 2000 lossless/lossy at full resolution and at each reduce level.

Run: ``.venv/bin/python benchmarks/decode_speed.py [--size 2000 1955] [--repeat 5] [--target 224]``.
Single-threaded, warm (one untimed decode first), best-of-N and median in ms. Every time is a whole public
``read_image`` call (header parse, decode at that wavelet level, modality LUT, inversion). Prints a table and
returns a flat list of dicts; also reports the parity of preprocess(reduced) vs preprocess(full) per level.
Not a test: numbers depend on the machine and its load (say which when you quote them).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from pydicom import uid  # noqa: E402

from xbmd_batch import dicom_io  # noqa: E402
from xbmd_batch.config import PreprocessConfig  # noqa: E402
from xbmd_batch.dicom_io import J2K_OVERSAMPLE, read_image  # noqa: E402
from xbmd_batch.preprocess import preprocess_image  # noqa: E402
from xbmd_batch.testing import hip_phantom, make_dicom  # noqa: E402


def _time(fn: Any, repeat: int) -> tuple[float, float]:
    fn()  # warm-up (imports, page cache)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return min(ts), statistics.median(ts)


def run(rows: int, cols: int, repeat: int, target: int, bits: int = 12) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    px = hip_phantom(rows, cols, bits, seed=1)
    cfg = PreprocessConfig(image_size=target)
    with tempfile.TemporaryDirectory() as d:
        files = {
            "uncompressed": make_dicom(Path(d, "raw.dcm"), pixels=px, bits_stored=bits),
            "rle": make_dicom(
                Path(d, "rle.dcm"), pixels=px, bits_stored=bits, transfer_syntax=uid.RLELossless
            ),
            "j2k_lossless": make_dicom(
                Path(d, "j2k.dcm"), pixels=px, bits_stored=bits, transfer_syntax=uid.JPEG2000Lossless
            ),
            "j2k_lossy": make_dicom(
                Path(d, "j2kl.dcm"), pixels=px, bits_stored=bits, transfer_syntax=uid.JPEG2000
            ),
        }
        hdr_best, hdr_med = _time(lambda: dicom_io.read_header(files["uncompressed"]), repeat)
        out.append({"case": "header_only", "level": 0, "best_ms": hdr_best, "median_ms": hdr_med})
        for name, p in files.items():
            mb = p.stat().st_size / 2**20
            best, med = _time(lambda p=p: read_image(p), repeat)
            full_img, info = read_image(p)
            full_pre = preprocess_image(full_img, cfg)
            out.append(
                {
                    "case": name,
                    "decoder": info.decoder,
                    "level": 0,
                    "shape": info.decoded_shape,
                    "file_mb": round(mb, 2),
                    "best_ms": best,
                    "median_ms": med,
                }
            )
            if not name.startswith("j2k"):
                continue
            # Each wavelet level through the public read_image: the target size that makes it choose level L
            # (short side / 2**L / J2K_OVERSAMPLE); stop once a smaller target no longer reduces further.
            level, short = 0, min(rows, cols)
            while True:
                want = level + 1
                tgt = max(1, short // (2**want * J2K_OVERSAMPLE))
                red, info = read_image(p, target_size=tgt)
                if info.reduce_level != want:
                    break
                level = want
                best, med = _time(lambda p=p, tgt=tgt: read_image(p, target_size=tgt), repeat)
                pre = preprocess_image(red, cfg, subsample=2**level, full_shape=(rows, cols))
                diff = np.abs(pre - full_pre)
                chosen = read_image(p, target_size=target)[1].reduce_level == level
                out.append(
                    {
                        "case": name,
                        "decoder": info.decoder,
                        "level": level,
                        "shape": red.shape,
                        "best_ms": best,
                        "median_ms": med,
                        "chosen_for_target": chosen,
                        "parity_mean": float(diff.mean()),
                        "parity_p99": float(np.percentile(diff, 99)),
                        "parity_max": float(diff.max()),
                    }
                )
            # End to end through the public API (what score/train call): read_image with target_size.
            best, med = _time(lambda p=p: read_image(p, target_size=target), repeat)
            out.append(
                {
                    "case": f"{name}+read_image(target={target})",
                    "level": read_image(p, target)[1].reduce_level,
                    "best_ms": best,
                    "median_ms": med,
                }
            )
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", nargs=2, type=int, default=[2000, 1955], metavar=("ROWS", "COLS"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--target", type=int, default=224)
    ap.add_argument("--bits", type=int, default=12)
    args = ap.parse_args(argv)
    res = run(args.size[0], args.size[1], args.repeat, args.target, args.bits)
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()} cpus={os.cpu_count()} "
        f"load={os.getloadavg()} image={args.size[0]}x{args.size[1]} {args.bits}-bit target={args.target}"
    )
    print(f"{'case':42s} {'lvl':>3s} {'shape':>12s} {'best ms':>8s} {'med ms':>8s}  parity mean/p99/max")
    for r in res:
        par = (
            f"{r['parity_mean']:.4f}/{r['parity_p99']:.3f}/{r['parity_max']:.3f}"
            if "parity_mean" in r
            else ""
        )
        mark = " *" if r.get("chosen_for_target") else ""
        print(
            f"{r['case']:42s} {r['level']:>3d} {str(tuple(r.get('shape', ()))):>12s} {r['best_ms']:8.1f} "
            f"{r['median_ms']:8.1f}  {par}{mark}"
        )
    return res


if __name__ == "__main__":
    main()
