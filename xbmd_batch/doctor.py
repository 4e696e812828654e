"""`xbmd-batch doctor`: what this machine can run (torch/CUDA, onnxruntime providers, TensorRT, DICOM codecs).

Every heavy import happens inside a function and is reported, not raised, when it fails: the point of doctor
is to explain a broken environment, so it must work in one.
"""

from __future__ import annotations

import platform
import sys
from typing import Any


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def torch_info() -> dict[str, Any]:
    """torch version, CUDA build/runtime availability and device names."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken CUDA library at import
        return {"installed": False, "error": _error(e)}
    info: dict[str, Any] = {
        "installed": True,
        "version": str(torch.__version__),
        "cuda_build": torch.version.cuda,
        "cuda_available": False,
        "devices": [],
    }
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                info["devices"].append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    except Exception as e:
        info["error"] = _error(e)
    try:
        import torchvision

        info["torchvision"] = str(torchvision.__version__)
    except Exception as e:
        info["torchvision"] = f"not importable ({_error(e)})"
    return info


# The three pieces of the GPU stack and how each is installed (docs/gpu.md says more).
GPU_INSTALL_HINTS = {
    "torch-cuda": "install a CUDA build of torch (README: `pip install torch==2.14.1 torchvision==0.29.1` "
    "gives CUDA 13.0 on Linux x86-64) and check the NVIDIA driver (`nvidia-smi`)",
    "onnxruntime-cuda": "pip install 'xbmd-batch[gpu]' (onnxruntime-gpu, from the standard index; uninstall "
    "the CPU `onnxruntime` package first: both provide the same module)",
    "tensorrt": "pip install 'xbmd-batch[tensorrt]' with NVIDIA's index reachable "
    "(--extra-index-url https://pypi.nvidia.com) or from a wheelhouse (docs/gpu.md); optional: without it "
    "`auto` uses onnxruntime-CUDA",
}
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def _installed_distributions(names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` pip has installed (two onnxruntime builds overwrite each other's module)."""
    from importlib import metadata

    found = []
    for n in names:
        try:
            metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
        found.append(n)
    return found


def onnxruntime_info() -> dict[str, Any]:
    """onnxruntime version, which pip distributions provide it, and the execution providers it offers."""
    dists = _installed_distributions(ORT_DISTRIBUTIONS)
    try:
        import onnxruntime as ort
    except Exception as e:
        return {
            "installed": False,
            "distributions": dists,
            "error": _error(e),
            "hint": "pip install 'xbmd-batch[cpu]' (or [gpu]; never both)",
        }
    return {
        "installed": True,
        "distributions": dists,
        "version": ort.__version__,
        "device": ort.get_device(),
        "providers": list(ort.get_available_providers()),
    }


def tensorrt_info() -> dict[str, Any]:
    """TensorRT presence and version (absent on CPU machines, which is fine)."""
    try:
        import tensorrt as trt
    except Exception as e:
        return {"installed": False, "error": _error(e), "hint": "optional: " + GPU_INSTALL_HINTS["tensorrt"]}
    return {"installed": True, "version": str(trt.__version__)}


def gpu_stack(info: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per GPU piece (torch-cuda, onnxruntime-cuda, tensorrt): ready or not, why, and the fix.

    A pure function of ``collect()``'s dict, so the wording is testable without a GPU.
    """
    t, o, r = info["torch"], info["onnxruntime"], info["tensorrt"]
    rows: list[dict[str, Any]] = []
    if not t.get("installed"):
        rows.append({"piece": "torch-cuda", "ready": False, "why": "torch is not importable"})
    elif t.get("cuda_available"):
        rows.append({"piece": "torch-cuda", "ready": True, "why": ", ".join(t.get("devices", []))})
    elif not t.get("cuda_build"):
        rows.append(
            {"piece": "torch-cuda", "ready": False, "why": f"torch {t['version']} is a CPU-only build"}
        )
    else:
        rows.append(
            {
                "piece": "torch-cuda",
                "ready": False,
                "why": f"torch built for CUDA {t['cuda_build']} sees no GPU",
                "fix": "check the NVIDIA driver (`nvidia-smi`) and CUDA_VISIBLE_DEVICES",
            }
        )
    dists = o.get("distributions", [])
    if len(dists) > 1:
        why = f"both {' and '.join(dists)} are installed: they overwrite each other's `onnxruntime` module"
        rows.append({"piece": "onnxruntime-cuda", "ready": False, "why": why})
    elif not o.get("installed"):
        rows.append({"piece": "onnxruntime-cuda", "ready": False, "why": "onnxruntime is not importable"})
    elif "CUDAExecutionProvider" in o.get("providers", []):
        # the GPU wheel lists its CUDA provider even without a GPU; it loads only when torch-cuda is ready
        rows.append({"piece": "onnxruntime-cuda", "ready": True, "why": f"onnxruntime {o['version']}"})
    else:
        why = f"onnxruntime {o['version']} is the CPU build (providers: {', '.join(o.get('providers', []))})"
        rows.append({"piece": "onnxruntime-cuda", "ready": False, "why": why})
    if r.get("installed"):
        rows.append({"piece": "tensorrt", "ready": True, "why": f"TensorRT {r['version']}"})
    else:
        rows.append({"piece": "tensorrt", "ready": False, "why": f"not importable ({r.get('error', '')})"})
    for row in rows:
        row.setdefault("fix", "" if row["ready"] else GPU_INSTALL_HINTS[row["piece"]])
    return rows


def dicom_decoders() -> list[dict[str, Any]]:
    """One row per transfer syntax pydicom has a decoder for: decodable here, and by which plugins."""
    try:
        import pydicom
        from pydicom.pixels import decoders
        from pydicom.pixels.decoders.base import Decoder
    except Exception as e:
        return [{"uid": "", "name": "pydicom not importable", "available": False, "error": _error(e)}]
    rows = []
    for attr in sorted(dir(decoders)):
        dec = getattr(decoders, attr)
        if not isinstance(dec, Decoder):
            continue
        missing = dec.missing_dependencies
        rows.append(
            {
                "uid": str(dec.UID),
                "name": dec.UID.name,
                "available": bool(dec.is_available),
                "plugins": list(dec.available_plugins),
                "missing": [m.splitlines()[0] for m in missing] if not dec.is_available else [],
                "pydicom": pydicom.__version__,
            }
        )
    rows.sort(key=lambda r: (not r["available"], r["name"]))
    return rows


def collect() -> dict[str, Any]:
    """Everything doctor knows, as plain types (for --json and for run manifests)."""
    from xbmd_batch import __version__

    info: dict[str, Any] = {
        "xbmd_batch": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch_info(),
        "onnxruntime": onnxruntime_info(),
        "tensorrt": tensorrt_info(),
        "dicom_decoders": dicom_decoders(),
        "jpeg2000_decode": jpeg2000_decode(),
    }
    info["gpu_stack"] = gpu_stack(info)
    return info


def jpeg2000_decode() -> dict[str, Any]:
    """Which JPEG 2000 decoder scoring uses: nvImageCodec on the GPU (inside the scoring loop, when
    preprocessing finishes on CUDA: ``score/placement.plan_j2k``) when it imports with libnvjpeg2k and CUDA is
    there, else the CPU resolution-aware decode in the decode workers (Pillow's openjpeg at the wavelet level
    the model needs). The GPU decoder is self-tested when a run plans it; this builds no CUDA context."""
    from xbmd_batch.gpu_j2k import status

    gpu, why = status()
    if gpu:
        return {"active": "nvimgcodec-gpu", "detail": why}
    fix = "pip install 'nvidia-nvimgcodec-cu13[nvjpeg2k]' (the gpu extra) on a CUDA machine for GPU decode"
    return {"active": "cpu-reduced (pillow-openjpeg)", "detail": f"{why}. {fix}"}


def _yes(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[red]no[/red]"


def render(info: dict[str, Any], console: Any = None) -> None:
    """Print ``collect()``'s result as rich tables."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    env = Table(title="xbmd-batch doctor: runtime", show_header=True)
    env.add_column("component")
    env.add_column("status")
    env.add_column("details", overflow="fold")
    env.add_row("xbmd-batch", info["xbmd_batch"], f"python {info['python']} on {info['platform']}")

    t = info["torch"]
    if t["installed"]:
        devices = ", ".join(t["devices"]) or "no CUDA device"
        env.add_row(
            "torch", t["version"], f"torchvision {t.get('torchvision')}; CUDA build {t['cuda_build']}"
        )
        env.add_row(
            "CUDA", _yes(t["cuda_available"]), escape(devices + (f"; {t['error']}" if "error" in t else ""))
        )
    else:
        env.add_row("torch", _yes(False), escape(t["error"]))

    o = info["onnxruntime"]
    if o["installed"]:
        env.add_row(
            "onnxruntime", o["version"], f"device {o['device']}; providers: {', '.join(o['providers'])}"
        )
    else:
        env.add_row("onnxruntime", _yes(False), escape(f"{o['error']} - {o['hint']}"))

    r = info["tensorrt"]
    if r["installed"]:
        env.add_row("TensorRT", r["version"], "")
    else:
        env.add_row("TensorRT", "not installed", escape(f"{r['error']} (optional; see the GPU stack table)"))
    j = info.get("jpeg2000_decode")
    if j:
        env.add_row("JPEG 2000 decode", escape(j["active"]), escape(j["detail"]))
    console.print(env)

    stack = Table(title="GPU stack: what is missing and how to add it", show_header=True)
    stack.add_column("piece")
    stack.add_column("ready")
    stack.add_column("why / fix", overflow="fold")
    for row in info.get("gpu_stack") or gpu_stack(info):
        text = row["why"] if row["ready"] else f"{row['why']}. Fix: {row['fix']}"
        stack.add_row(row["piece"], _yes(row["ready"]), escape(text))
    console.print(stack)

    dec = Table(title="DICOM transfer syntaxes (pydicom pixel decoders)", show_header=True)
    dec.add_column("transfer syntax")
    dec.add_column("UID", no_wrap=True)
    dec.add_column("decodable")
    dec.add_column("plugins / missing", overflow="fold")
    for row in info["dicom_decoders"]:
        if row["available"]:
            detail = ", ".join(row.get("plugins", [])) or "built in (uncompressed)"
        else:
            detail = "; ".join(row.get("missing", [])) or row.get("error", "")
        dec.add_row(escape(row["name"]), row["uid"], _yes(row["available"]), escape(detail))
    console.print(dec)
    n_ok = sum(r["available"] for r in info["dicom_decoders"])
    console.print(
        f"{n_ok}/{len(info['dicom_decoders'])} transfer syntaxes decodable. "
        "Compressed syntaxes need the 'jpeg' extra: pip install 'xbmd-batch\\[jpeg]'."
    )


def run_doctor(as_json: bool = False) -> dict[str, Any]:
    """Collect and print (tables, or JSON with ``as_json``); returns the collected dict."""
    info = collect()
    if as_json:
        import json

        print(json.dumps(info, indent=2))
    else:
        render(info)
    return info
