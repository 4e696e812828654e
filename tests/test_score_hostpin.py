"""score/hostpin: page-locking the decode pool's slots (fake CUDA calls on CPU; the real round trip is
gpu-marked and skips without a CUDA device)."""

from __future__ import annotations

import pytest

from xbmd_batch.score.hostpin import HostPinner, MiB

BASE, SLOT = 1 << 30, 16 * MiB


class _Cuda:
    """Fake cudaHostRegister / cudaHostUnregister: keeps the registered ranges, refuses overlaps (as the
    driver does), fails on request."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.ranges: dict[int, int] = {}
        self.calls = 0
        self.fail_at = fail_at

    def register(self, ptr: int, n: int) -> int:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            return 2  # cudaErrorMemoryAllocation
        if any(p < ptr + n and ptr < p + m for p, m in self.ranges.items()):
            return 712  # cudaErrorHostMemoryAlreadyRegistered
        self.ranges[ptr] = n
        return 0

    def unregister(self, ptr: int) -> int:
        return 0 if self.ranges.pop(ptr, None) is not None else 713  # ...NotRegistered


def _pinner(cuda: _Cuda, n_slots: int = 4, cleared: list[int] | None = None) -> HostPinner:
    return HostPinner(
        (BASE, n_slots * SLOT, SLOT),
        cuda.register,
        cuda.unregister,
        on_failure=None if cleared is None else (lambda: cleared.append(1)),
    )


def test_slots_are_registered_once_by_the_mib_and_grown() -> None:
    cuda = _Cuda()
    p = _pinner(cuda)
    assert p.ensure(BASE, 6_000_000)
    assert cuda.ranges == {BASE: 6 * MiB}  # rounded up to whole MiB, not the 16 MiB slot
    assert p.ensure(BASE, 5_000_000) and cuda.calls == 1  # covered: no new registration
    assert p.ensure(BASE + SLOT, 100)
    assert p.ensure(BASE, 7 * MiB + 1)  # a larger image in the same slot: unregister, register larger
    assert cuda.ranges == {BASE: 8 * MiB, BASE + SLOT: MiB}
    assert p.ensure(BASE + 2 * SLOT, 40 * MiB)  # never beyond its slot
    assert cuda.ranges[BASE + 2 * SLOT] == SLOT
    assert p.pinned_bytes == 8 * MiB + MiB + SLOT and p.registrations == 4
    r = p.report()
    assert r["pinned"] and r["bytes"] == p.pinned_bytes and r["failure"] is None and r["seconds"] >= 0
    p.close()
    assert cuda.ranges == {} and p.pinned_bytes == 0


def test_outside_the_block_or_off_a_slot_start_is_left_pageable() -> None:
    cuda = _Cuda()
    p = _pinner(cuda)
    assert not p.ensure(BASE - 4096, 100)  # an image sent by value
    assert not p.ensure(BASE + 4 * SLOT, 100)
    assert not p.ensure(BASE + 4096, 100)  # not where the hand-off places an image
    assert not p.ensure(BASE, 0)
    assert cuda.calls == 0 and p.report()["pinned"] is False
    assert p.report()["images_by_value"] == 2  # the two outside the block


def test_a_failed_registration_is_recorded_and_uploads_stay_pageable() -> None:
    cuda, cleared = _Cuda(fail_at=2), []
    p = _pinner(cuda, cleared=cleared)
    assert p.ensure(BASE, MiB)
    assert not p.ensure(BASE + SLOT, MiB)
    assert cleared == [1]  # the runtime's last error is cleared at once
    assert "cudaHostRegister" in (p.failure or "") and "error 2" in (p.failure or "")
    assert not p.ensure(BASE + 2 * SLOT, MiB) and cuda.calls == 2  # no further attempts
    assert p.ensure(BASE, MiB) is False  # after a failure nothing counts as page-locked
    rep = p.report()
    assert rep["pinned"] is False and rep["failure"] == p.failure
    p.close()
    assert cuda.ranges == {}  # what was registered is still unregistered


@pytest.mark.gpu
def test_cuda_registration_round_trip_on_shared_memory() -> None:
    """cudaHostRegister on a multiprocessing.shared_memory block: torch sees the range as pinned, a
    non-blocking copy from it is exact, and after close it is pageable again."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from multiprocessing import shared_memory

    import numpy as np

    from xbmd_batch.score.hostpin import cuda_pinner

    shm = shared_memory.SharedMemory(create=True, size=4 * SLOT)
    try:
        block = np.ndarray((4, SLOT), dtype=np.uint8, buffer=shm.buf)
        img = block[1, : 1500 * 1200 * 2].view(np.uint16).reshape(1500, 1200)
        img[...] = np.arange(img.size, dtype=np.uint64).reshape(img.shape) % 4096
        p = cuda_pinner((block.ctypes.data, block.nbytes, SLOT))
        assert p.ensure(img.ctypes.data, img.nbytes), p.failure
        host = torch.from_numpy(img)
        assert host.is_pinned()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            dev = host.to("cuda", non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
        ev.synchronize()
        assert torch.equal(dev.cpu(), host)
        p.close()
        assert p.failure is None and not torch.from_numpy(img).is_pinned()
        del host, img, block
    finally:
        shm.close()
        shm.unlink()


def test_page_locking_can_be_turned_off_for_a_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    """XBMD_PIN_SLOTS=0 (a benchmark knob): the CUDA batcher attaches without registering anything and
    run.json's upload entry says why; otherwise it builds the pinner (unregistered on the pool's close)."""
    pytest.importorskip("torch")
    from xbmd_batch.config import PreprocessConfig
    from xbmd_batch.score import hostpin
    from xbmd_batch.score.batcher import DeviceBatcher

    class Pool:
        def __init__(self) -> None:
            self.closers: list[object] = []

        def block_span(self) -> tuple[int, int, int]:
            return (BASE, 4 * SLOT, SLOT)

        def on_close(self, cb: object) -> None:
            self.closers.append(cb)

    built: list[tuple[int, int, int]] = []
    monkeypatch.setattr(hostpin, "cuda_pinner", lambda span: built.append(span) or _pinner(_Cuda()))
    b = DeviceBatcher(2, PreprocessConfig(image_size=32), "cpu")
    b._cuda = True  # the CUDA branch of attach, without a GPU (the pinner is a fake)
    monkeypatch.setenv(hostpin.PIN_ENV, "0")
    pool = Pool()
    b.attach(pool)
    rep = b.pinning()
    assert built == [] and pool.closers == [] and rep is not None
    assert rep["pinned"] is False and "XBMD_PIN_SLOTS=0" in rep["disabled"]
    monkeypatch.delenv(hostpin.PIN_ENV)
    b2 = DeviceBatcher(2, PreprocessConfig(image_size=32), "cpu")
    b2._cuda = True
    b2.attach(pool)
    assert built == [(BASE, 4 * SLOT, SLOT)] and len(pool.closers) == 1
    assert "disabled" not in (b2.pinning() or {})
