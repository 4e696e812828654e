"""Pseudonymisation of identifiers in every output (`--pseudonymize KEYFILE`).

HMAC-SHA256(key, value) as lowercase hex: deterministic for one key (so tables from several runs still join),
irreversible without the key, and recomputable by whoever holds the key (they can look up their own subject).
Under pseudonymisation the subject key, the relative path (folder names often carry subject IDs) and the
Study/SOP Instance UIDs are all replaced by their HMACs; nothing else identifying is ever written.

Everything that turns an identifier into its output form lives here: the pseudonymiser, the plan's id
columns, the quarantine rows, reconciliation.json's lists, and the scrubbing of file paths out of error
messages (header and decode failures alike).
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xbmd_batch.errors import InputError

if TYPE_CHECKING:
    import polars as pl  # decode workers import this module for scrub(): keep polars out of them

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


# ------------------------------------------------------------------------------------------------------------
# Output form: every identifier that leaves the process goes through one of these
# ------------------------------------------------------------------------------------------------------------

OUTPUT_ID_COLUMNS = ("relative_path", "subject_key", "sop_instance_uid", "study_instance_uid")
_KEY_FIELDS = ("subject", "subject_key", "subject_id", "key", "patient_id")


def scrub(message: str, root: Path, rel: str) -> str:
    """Drop the file's path from an error message: the failure row names the file in its own (possibly
    pseudonymised) column, and folder names often carry subject IDs."""
    for s in (str(root / rel), str((root / rel).resolve()), rel):
        message = message.replace(s, "<file>")
    return message[:500]


def ids_for_output(items: pl.DataFrame, pseudo: Pseudonymizer) -> dict[str, np.ndarray]:
    """The plan's identifier columns in output form (object arrays indexed like the plan)."""
    return {c: np.array(pseudo.many(items.get_column(c).to_list()), dtype=object) for c in OUTPUT_ID_COLUMNS}


def failures_for_output(quarantine: pl.DataFrame, pseudo: Pseudonymizer) -> pl.DataFrame:
    """Quarantine rows with relative_path, subject_key and sop_instance_uid in output form."""
    import polars as pl

    return quarantine.with_columns(
        pl.Series(c, pseudo.many(quarantine.get_column(c).to_list()), pl.String)
        for c in ("relative_path", "subject_key", "sop_instance_uid")
    )


def listed_for_output(
    listed: dict[str, Any], pseudo: Pseudonymizer, meta_keys: list[str | None]
) -> dict[str, Any]:
    """reconciliation.json's lists with every identifier in output form (HMACed under --pseudonymize)."""
    out: dict[str, Any] = {
        "non_dicom_files": pseudo.many(listed["non_dicom_files"]),
        "hidden_files": pseudo.many(listed["hidden_files"]),
        "non_image_dicoms": pseudo.many(listed["non_image_dicoms"]),
        "skipped_links": [{**d, "path": pseudo(d["path"])} for d in listed.get("skipped_links", [])],
        "special_files": [{**d, "path": pseudo(d["path"])} for d in listed.get("special_files", [])],
        "metadata_rows_without_images": [
            {"meta_row": i, "subject_key": pseudo(meta_keys[i]) if i < len(meta_keys) else None}
            for i in listed["metadata_rows_without_images"]
        ],
        "metadata_duplicate_keys": [
            {"key": pseudo(d["key"]), "rows": d["rows"]} for d in listed["metadata_duplicate_keys"]
        ],
        "metadata_invalid_values": [],
    }
    for issue in listed["metadata_invalid_values"]:
        d = dict(issue)
        if pseudo.enabled:
            d.pop("raw", None)  # META cell text can be an identifier typed into the wrong column
        for k in list(d):
            if k in _KEY_FIELDS:
                d[k] = pseudo(None if d[k] is None else str(d[k]))
            elif pseudo.enabled and k in ("message", "value", "raw", "reason") and isinstance(d[k], str):
                for mk in meta_keys:  # a message quoting a key must not leak it
                    if mk and mk in d[k]:
                        d[k] = d[k].replace(mk, "<subject>")
        out["metadata_invalid_values"].append(d)
    return out


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
