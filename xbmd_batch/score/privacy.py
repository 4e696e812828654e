"""Pseudonymisation of identifiers in every output (`--pseudonymize KEYFILE`).

HMAC-SHA256(key, value) as lowercase hex: deterministic for one key (so tables from several runs still join),
irreversible without the key, and recomputable by whoever holds the key (they can look up their own subject).
Under pseudonymisation the subject key, the relative path (folder names often carry subject IDs) and the
Study/SOP Instance UIDs are all replaced by their HMACs; nothing else identifying is ever written.
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from pathlib import Path

from xbmd_batch.errors import InputError

MIN_KEY_BYTES = 16


class Pseudonymizer:
    """Maps identifiers to HMAC pseudonyms, or passes them through when no key is given."""

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise InputError(
                f"pseudonymisation key is {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes"
            )
        self._key = key

    @classmethod
    def from_keyfile(cls, path: Path | None) -> Pseudonymizer:
        """Read the key file's bytes, surrounding whitespace stripped (`openssl rand -hex 32 > k` works)."""
        if path is None:
            return cls(None)
        try:
            key = Path(path).read_bytes().strip()
        except OSError as e:
            raise InputError(f"{path}: cannot read pseudonymisation key file: {e.strerror or e}") from e
        if not key:
            raise InputError(f"{path}: pseudonymisation key file is empty")
        return cls(key)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    @property
    def fingerprint(self) -> str | None:
        """A key identifier safe to record (HMAC of a fixed label, not of data): detects a changed key."""
        if self._key is None:
            return None
        return hmac.new(self._key, b"xbmd-batch key fingerprint", hashlib.sha256).hexdigest()[:16]

    def __call__(self, value: str | None) -> str | None:
        if value is None or self._key is None:
            return value
        return hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def many(self, values: list[str | None]) -> list[str | None]:
        return [self(v) for v in values] if self._key is not None else list(values)


def silence_dicom_warnings() -> None:
    """Stop pydicom's per-file warnings reaching stderr during a cohort run.

    They quote raw header values and file paths ("Invalid value for VR UI: '1.2.840.PID_Smith_John.1'"), so
    under ``--pseudonymize`` they would leak identifiers, and on a 100k cohort they bury the summary. Every
    file that cannot be used becomes a failure row with a reason instead. Installed by the CLI and in each
    decode worker (both are whole processes of our own); idempotent.
    """
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    # pydicom warns with stacklevel > 1, which attributes some warnings to our reading code
    warnings.filterwarnings("ignore", category=UserWarning, module=r"xbmd_batch\.(dicom_io|preprocess|score)")
