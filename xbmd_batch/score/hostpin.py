"""Page-locking the decode pool's shared-memory slots for asynchronous uploads (``--preprocess-device cuda``).

A host-to-device copy from pageable memory is staged by the CUDA driver through its own pinned buffer, one
chunk at a time, and the call returns only once the source has been read; from page-locked memory it is a
plain DMA that runs on a stream while the host goes on. The slots the decode workers write into are a
``multiprocessing.shared_memory`` block; ``cudaHostRegister`` page-locks a range of it in this process
(``torch.cuda.cudart()``, the runtime torch itself was built with; torch's own
``torch.cuda._pin_memory_utils`` registers shared memory the same way, flag ``cudaHostRegisterPortable``).

What is registered: each slot from its start, rounded up to whole MiB, only as far as images handed over
through it reached (a 16 MiB slot holding ~6 MB images pins 6 MiB, not 16), on first use, grown (unregister,
register larger) when a larger image arrives. The slot is idle then: the pool hands a group back to a
worker only after the copies out of it completed (``DecodePool.hold``), and the batcher registers before it
copies. Registration touches (allocates) the pages, so its cost is paid once per slot on the main thread:
``report()`` says how many bytes, how often, and how long it took, for run.json.

If a registration fails (an old driver, a container's memlock limit, a kernel that refuses a shared mapping)
the reason is kept, nothing else is registered, and the uploads stay correct on pageable memory (a
non-blocking copy from pageable memory is synchronous with respect to the source). The runtime's last-error
state is cleared after a failure, so it cannot surface later as the error of an unrelated kernel launch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

MiB = 1 << 20
REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context, not only the current
# XBMD_PIN_SLOTS=0 turns page-locking off (uploads from pageable memory): a benchmark knob, so one GPU run can
# measure what page-locking buys against what registering costs (benchmarks/gpu_first_light.sh)
PIN_ENV = "XBMD_PIN_SLOTS"


def pinning_disabled() -> str | None:
    """Why the slots are not to be page-locked (None: they are)."""
    import os

    if os.environ.get(PIN_ENV, "1").strip() == "0":
        return f"{PIN_ENV}=0: uploads from pageable memory"
    return None


def disabled_report(why: str) -> dict[str, Any]:
    """run.json's upload entry when page-locking was turned off."""
    return {
        "pinned": False,
        "bytes": 0,
        "registrations": 0,
        "seconds": 0.0,
        "failure": None,
        "images_by_value": 0,
        "disabled": why,
    }


class HostPinner:
    """Registers slot ranges inside one host block [base, base + nbytes) with slots of ``slot_bytes``.

    ``register(ptr, nbytes) -> int`` and ``unregister(ptr) -> int`` return a CUDA error code (0 = success);
    ``describe(code) -> str`` names one. Tests inject fakes; ``cuda_pinner`` wires ``torch.cuda.cudart()``.
    """

    def __init__(
        self,
        span: tuple[int, int, int],
        register: Callable[[int, int], int],
        unregister: Callable[[int], int],
        describe: Callable[[int], str] = str,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.base, self.nbytes, self.slot_bytes = (int(v) for v in span)
        self._register, self._unregister, self._describe = register, unregister, describe
        self._on_failure = on_failure
        self._ranges: dict[int, int] = {}  # slot start -> registered bytes
        self.failure: str | None = None
        self.registrations = 0
        self.seconds = 0.0
        self.by_value = 0  # images that did not come through the block (too big for a slot): pageable

    def covers(self, ptr: int) -> bool:
        return self.base <= ptr < self.base + self.nbytes

    def ensure(self, ptr: int, nbytes: int) -> bool:
        """Page-lock [ptr, ptr + nbytes) (``ptr``: a slot's start, where the hand-off places an image); True
        when it is page-locked now. False outside the block (an image sent by value) or after a failure."""
        if not self.covers(ptr):
            self.by_value += 1
            return False
        if self.failure is not None or nbytes <= 0:
            return False
        off = ptr - self.base
        slot_start = self.base + off // self.slot_bytes * self.slot_bytes
        if slot_start != ptr:  # the hand-off always starts an image at its slot's start
            return False
        have = self._ranges.get(ptr, 0)
        if have >= nbytes:
            return True
        want = min(self.slot_bytes, -(-nbytes // MiB) * MiB, self.base + self.nbytes - ptr)
        t0 = time.perf_counter()
        try:
            if have:
                code = int(self._unregister(ptr))
                del self._ranges[ptr]
                if code != 0:
                    return self._fail(f"cudaHostUnregister: {self._describe(code)} (error {code})")
            code = int(self._register(ptr, want))
            if code != 0:
                return self._fail(
                    f"cudaHostRegister of {want} bytes of the decode pool's shared memory: "
                    f"{self._describe(code)} (error {code}); uploads stay pageable"
                )
            self._ranges[ptr] = want
            self.registrations += 1
            return True
        finally:
            self.seconds += time.perf_counter() - t0

    def _fail(self, why: str) -> bool:
        self.failure = why
        if self._on_failure is not None:
            self._on_failure()
        return False

    @property
    def pinned_bytes(self) -> int:
        return sum(self._ranges.values())

    def close(self) -> None:
        """Unregister every range (before the block is unmapped; every copy out of it has completed)."""
        ranges, self._ranges = self._ranges, {}
        for ptr in ranges:
            code = int(self._unregister(ptr))
            if code != 0 and self.failure is None:
                self.failure = f"cudaHostUnregister: {self._describe(code)} (error {code})"

    def report(self) -> dict[str, Any]:
        """run.json: what was page-locked (bytes at the end of the run, registrations, seconds) or why not."""
        return {
            "pinned": self.failure is None and self.registrations > 0,
            "bytes": self.pinned_bytes,
            "registrations": self.registrations,
            "seconds": round(self.seconds, 4),
            "failure": self.failure,
            "images_by_value": self.by_value,
        }


def cuda_pinner(span: tuple[int, int, int]) -> HostPinner:
    """A HostPinner on ``torch.cuda.cudart()`` (``cudaHostRegister(ptr, size, flags)`` and
    ``cudaHostUnregister(ptr)`` return a ``cudaError``; 0 is success)."""
    import torch

    cudart = torch.cuda.cudart()

    def describe(code: int) -> str:
        try:
            return str(cudart.cudaGetErrorString(cudart.cudaError(code)))
        except Exception:  # noqa: BLE001 - a name is a nicety; the code is in the message anyway
            return f"cudaError {code}"

    return HostPinner(
        span,
        lambda ptr, n: int(cudart.cudaHostRegister(ptr, n, REGISTER_PORTABLE)),
        lambda ptr: int(cudart.cudaHostUnregister(ptr)),
        describe,
        on_failure=clear_cuda_last_error,
    )


def clear_cuda_last_error() -> None:
    """Reset the CUDA runtime's last error of this thread (``cudaGetLastError``) after a failed call whose
    code was handled, so torch's next kernel-launch check does not report it. Best effort: the runtime is
    found among the libraries this process has loaded (torch's wheel ships its own libcudart)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        return
    for path in sorted(paths):
        try:
            ctypes.CDLL(path).cudaGetLastError()
        except (OSError, AttributeError):
            continue
