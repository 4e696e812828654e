"""The engine cache: what makes an engine valid, its file-name key, the sidecar, lookup and store.

An engine is valid only for the GPU model, compute capability, TensorRT version, ONNX sha256, precision and
optimization profile it was built for. The key holds all of them (a readable prefix plus a hash); a sidecar
JSON beside each engine repeats them (plus parity figures), and an engine whose sidecar disagrees with the
current machine is refused with the command that rebuilds it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xbmd_batch.config import INPUT_NAMES
from xbmd_batch.defaults import DEFAULT_BATCH_SIZE, TRT_PRECISIONS
from xbmd_batch.errors import InputError, StaleEngineError
from xbmd_batch.fsutil import atomic_write_bytes, sha256_file
from xbmd_batch.infer.tensorrt.device import DeviceInfo

if TYPE_CHECKING:
    from xbmd_batch.modelcard import ModelCard

SIDECAR_SUFFIX = ".json"
ENGINE_SUFFIX = ".engine"

Profile = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
Log = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$XBMD_ENGINE_CACHE`` or ``~/.cache/xbmd_batch/engines`` (engines are per machine)."""
    env = os.environ.get("XBMD_ENGINE_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "xbmd_batch" / "engines"


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built from and for (everything except the machine)."""

    onnx_sha256: str
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = DEFAULT_BATCH_SIZE
    max_batch: int = DEFAULT_BATCH_SIZE
    image_size: int = 224
    in_chans: int = 1
    n_fields: int = 10
    input_names: tuple[str, ...] = INPUT_NAMES

    def __post_init__(self) -> None:
        if self.precision not in TRT_PRECISIONS:
            raise InputError(f"TensorRT precision must be one of {TRT_PRECISIONS}, got {self.precision!r}")
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise InputError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got "
                f"min={self.min_batch} opt={self.opt_batch} max={self.max_batch}"
            )

    @classmethod
    def for_card(
        cls,
        onnx_sha256: str,
        card: ModelCard,
        precision: str = "fp16",
        opt_batch: int = DEFAULT_BATCH_SIZE,
        max_batch: int | None = None,
        min_batch: int = 1,
    ) -> EngineSpec:
        cfg = card.model_config
        return cls(
            onnx_sha256=onnx_sha256,
            precision=precision,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch if max_batch is not None else opt_batch,
            image_size=cfg.image_size,
            in_chans=cfg.in_chans,
            n_fields=cfg.n_fields,
            input_names=tuple(card.input_names),
        )

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shape per input: only dim 0 (batch) varies; kernels are tuned for ``opt_batch``."""
        image, meta, mask = self.input_names
        rest = {
            image: (self.in_chans, self.image_size, self.image_size),
            meta: (self.n_fields,),
            mask: (self.n_fields,),
        }
        return {
            name: ((self.min_batch, *r), (self.opt_batch, *r), (self.max_batch, *r))
            for name, r in rest.items()
        }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def _normalize_profile(profile: Profile | tuple[int, int, int]) -> dict[str, list[list[int]]] | list[int]:
    if isinstance(profile, tuple | list) and len(profile) == 3 and all(isinstance(x, int) for x in profile):
        return [int(x) for x in profile]
    if isinstance(profile, Mapping):
        return {str(k): [list(map(int, s)) for s in v] for k, v in sorted(profile.items())}
    raise TypeError(
        f"profile must be (min, opt, max) batch sizes or name -> (min, opt, max) shapes: {profile!r}"
    )


def _batch_triplet(profile: Profile | tuple[int, int, int]) -> tuple[int, int, int]:
    p = _normalize_profile(profile)
    if isinstance(p, list):
        return p[0], p[1], p[2]
    first = next(iter(p.values()))
    return first[0][0], first[1][0], first[2][0]


def engine_cache_key(
    gpu_name: str,
    compute_capability: str,
    trt_version: str,
    onnx_sha256: str,
    precision: str,
    profile: Profile | tuple[int, int, int],
) -> str:
    """A file-name-safe key: a readable prefix (GPU, sm, TRT, precision, batches) + a hash of all fields.

    The readable part lets a person see in ``ls`` which engine is which; the hash makes the key change when
    any field changes, including full profile shapes that the prefix abbreviates.
    """
    fields = {
        "gpu_name": gpu_name,
        "compute_capability": str(compute_capability),
        "trt_version": str(trt_version),
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profile": _normalize_profile(profile),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    b_min, b_opt, b_max = _batch_triplet(profile)
    cc = str(compute_capability).replace(".", "")
    prefix = f"{_slug(gpu_name)}-sm{cc}-trt{_slug(str(trt_version))}-{precision}-b{b_min}-{b_opt}-{b_max}"
    return f"{prefix}-{onnx_sha256[:8]}-{digest}"


def _identity(spec: EngineSpec, device: DeviceInfo) -> dict[str, Any]:
    """The sidecar fields that must equal the current machine + request for an engine to be usable."""
    return {
        "gpu_name": device.gpu_name,
        "compute_capability": device.compute_capability,
        "trt_version": device.trt_version,
        "onnx_sha256": spec.onnx_sha256,
        "precision": spec.precision,
        "profile": _normalize_profile(spec.profile()),
    }


def profile_covers(built: Any, wanted: Any) -> bool:
    """Whether an engine built with profile ``built`` runs every shape of ``wanted`` (both as stored in a
    sidecar: input name -> [min, opt, max] shapes): same inputs and non-batch dims, built min <= wanted min
    and built max >= wanted max. The opt batch only tunes kernels, so it does not have to match."""
    if not isinstance(built, dict) or not isinstance(wanted, dict) or set(built) != set(wanted):
        return False
    for name, (w_min, _w_opt, w_max) in wanted.items():
        try:
            b_min, _b_opt, b_max = built[name]
        except (TypeError, ValueError):
            return False
        if list(b_min[1:]) != list(w_min[1:]) or list(b_max[1:]) != list(w_max[1:]):
            return False
        if b_min[0] > w_min[0] or b_max[0] < w_max[0]:
            return False
    return True


def rebuild_hint(onnx_path: str | os.PathLike[str] | None, spec: EngineSpec, cache_dir: Path | None) -> str:
    onnx_arg = os.fspath(onnx_path) if onnx_path else "model.onnx"
    cache = f" --cache-dir {cache_dir}" if cache_dir else ""
    return (
        f"rebuild it with `python -m export tensorrt {onnx_arg} --precision {spec.precision} "
        f"--opt-batch {spec.opt_batch} --max-batch {spec.max_batch}{cache} --rebuild` (or delete the engine "
        f"file and let `xbmd-batch score` rebuild it)"
    )


@dataclass
class EngineRecord:
    """A usable engine on disk and its sidecar contents; ``built`` says whether this call built it."""

    engine_path: Path
    sidecar_path: Path
    meta: dict[str, Any]
    built: bool = False

    @property
    def key(self) -> str:
        return str(self.meta.get("key", self.engine_path.stem))


@dataclass
class EngineCache:
    """A directory of ``<key>.engine`` + ``<key>.json`` pairs, written atomically."""

    root: Path
    onnx_path: Path | None = None  # only for the rebuild hint in messages
    log: Log | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._locks: dict[str, Any] = {}

    def key_for(self, spec: EngineSpec, device: DeviceInfo) -> str:
        return engine_cache_key(
            device.gpu_name,
            device.compute_capability,
            device.trt_version,
            spec.onnx_sha256,
            spec.precision,
            spec.profile(),
        )

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}{ENGINE_SUFFIX}", self.root / f"{key}{SIDECAR_SUFFIX}"

    def timing_cache_path(self, device: DeviceInfo) -> Path:
        """One kernel timing cache per GPU model + TensorRT version, shared by every profile/precision."""
        sm = device.compute_capability.replace(".", "")
        return self.root / f"timing-{_slug(device.gpu_name)}-sm{sm}-trt{_slug(device.trt_version)}.cache"

    def lock(self, spec: EngineSpec, device: DeviceInfo, timeout: float = -1) -> Any:
        """A file lock per GPU x TensorRT x ONNX x precision (the engines that could serve each other).

        Builders hold it from lookup to store, so two processes (or nodes sharing the cache over a file
        system with working ``flock``) build once; ``lookup`` takes it too, so a reader never sees an engine
        beside the sidecar of another. Reentrant within this cache object.
        """
        from filelock import FileLock

        sm = device.compute_capability.replace(".", "")
        name = (
            f"{_slug(device.gpu_name)}-sm{sm}-trt{_slug(device.trt_version)}-{spec.precision}-"
            f"{spec.onnx_sha256[:16]}.lock"
        )
        if name not in self._locks:
            self.root.mkdir(parents=True, exist_ok=True)
            self._locks[name] = FileLock(os.fspath(self.root / name), timeout=timeout)
        return self._locks[name]

    def lookup(self, spec: EngineSpec, device: DeviceInfo, *, exact: bool = False) -> EngineRecord | None:
        """A cached engine that serves ``spec`` on ``device``; None on a miss.

        The exact key first; then (unless ``exact``) any engine for the same GPU, TensorRT, ONNX and precision
        whose profile covers the requested one (``profile_covers``: min <= requested min, max >= requested
        max), preferring the same opt batch, then the smallest max. So the documented
        ``python -m export tensorrt --opt-batch 32 --max-batch 64`` engine serves ``score -b 32``. An
        exact-key engine that fails verification raises StaleEngineError; a broken candidate is skipped.
        """
        if not self.root.is_dir():
            return None
        with self.lock(spec, device):
            key = self.key_for(spec, device)
            engine, sidecar = self.paths(key)
            if engine.exists():
                meta = verify_engine_file(engine, spec, device, cache_dir=self.root, onnx_path=self.onnx_path)
                return EngineRecord(engine, sidecar, meta, built=False)
            if exact:
                return None
            want = _identity(spec, device)
            found: list[tuple[tuple[int, int, str], dict[str, Any], Path]] = []
            for side in self.root.glob(f"*{SIDECAR_SUFFIX}"):
                try:
                    meta = json.loads(side.read_text())
                except (OSError, ValueError):
                    continue
                if not isinstance(meta, dict) or any(
                    meta.get(k) != v for k, v in want.items() if k != "profile"
                ):
                    continue
                eng = side.with_suffix(ENGINE_SUFFIX)
                if eng.exists() and profile_covers(meta.get("profile"), want["profile"]):
                    rank = (
                        int(meta.get("opt_batch") != spec.opt_batch),
                        int(meta.get("max_batch") or 0),
                        side.name,
                    )
                    found.append((rank, meta, eng))
            for _rank, meta, eng in sorted(found, key=lambda t: t[0]):
                built_spec = dataclasses.replace(
                    spec,
                    min_batch=meta["min_batch"],
                    opt_batch=meta["opt_batch"],
                    max_batch=meta["max_batch"],
                )
                try:
                    verified = verify_engine_file(eng, built_spec, device, self.root, self.onnx_path)
                except (StaleEngineError, KeyError, TypeError):
                    continue
                if self.log:
                    self.log(
                        f"engine cache: reusing {eng.name} (batch {meta['min_batch']}/{meta['opt_batch']}/"
                        f"{meta['max_batch']}) for batch {spec.min_batch}..{spec.max_batch}"
                    )
                return EngineRecord(eng, eng.with_suffix(SIDECAR_SUFFIX), verified, built=False)
            return None

    def store(
        self,
        spec: EngineSpec,
        device: DeviceInfo,
        engine_bytes: bytes,
        extra: Mapping[str, Any] | None = None,
    ) -> EngineRecord:
        """Write engine then sidecar (each atomically) under the cache lock, so a reader (``lookup`` takes the
        same lock) never sees an engine with a wrong sidecar."""
        from xbmd_batch import __version__

        key = self.key_for(spec, device)
        engine, sidecar = self.paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "key": key,
            **_identity(spec, device),
            "min_batch": spec.min_batch,
            "opt_batch": spec.opt_batch,
            "max_batch": spec.max_batch,
            "image_size": spec.image_size,
            "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
            "engine_bytes": len(engine_bytes),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "xbmd_batch": __version__,
            **dict(extra or {}),
        }
        with self.lock(spec, device):
            sidecar.unlink(missing_ok=True)  # never leave an old sidecar next to a new engine
            atomic_write_bytes(engine, engine_bytes)
            atomic_write_bytes(sidecar, json.dumps(meta, indent=2, sort_keys=True).encode())
        return EngineRecord(engine, sidecar, meta, built=True)


def verify_engine_file(
    engine_path: str | os.PathLike[str],
    spec: EngineSpec,
    device: DeviceInfo,
    cache_dir: Path | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Check an engine's sidecar against the current machine and request; return the sidecar dict.

    Refuses (StaleEngineError, with the rebuild command) a missing/unreadable sidecar, any identity field
    that differs, or engine bytes whose sha256 differs from the sidecar's (a truncated or replaced file).
    """
    engine_path = Path(engine_path)
    sidecar = engine_path.with_suffix(SIDECAR_SUFFIX)
    hint = rebuild_hint(onnx_path, spec, cache_dir)
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise StaleEngineError(f"{engine_path}: engine has no sidecar {sidecar.name}; {hint}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise StaleEngineError(f"{engine_path}: unreadable sidecar {sidecar.name} ({e}); {hint}") from e
    want = _identity(spec, device)
    diffs = [f"{k}: engine {meta.get(k)!r} vs current {v!r}" for k, v in want.items() if meta.get(k) != v]
    if diffs:
        raise StaleEngineError(
            f"{engine_path}: engine was built for something else ({'; '.join(diffs)}); {hint}"
        )
    expected_sha = meta.get("engine_sha256")
    if not expected_sha or sha256_file(engine_path) != expected_sha:
        raise StaleEngineError(f"{engine_path}: engine file does not match its sidecar sha256; {hint}")
    return meta


def describe(record: EngineRecord) -> dict[str, Any]:
    """Flat provenance for run manifests."""
    keep = (
        "key",
        "gpu_name",
        "compute_capability",
        "trt_version",
        "precision",
        "engine_sha256",
        "onnx_sha256",
    )
    d = {k: record.meta.get(k) for k in keep}
    d["engine_path"] = os.fspath(record.engine_path)
    d["parity_max_abs_bmd"] = (record.meta.get("parity") or {}).get("max_abs_bmd")
    return d
