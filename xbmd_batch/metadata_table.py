"""Reading a metadata table (CSV / TSV / parquet) as strings, and saying how it was read (`TableInfo`).

Text tables are sniffed (encoding, separator, decimal mark, Excel's ``sep=`` line) and every cell stays a
string: `metadata.validate_and_encode` parses cells, so a stray "n/a" is reported per cell. Messages name the
file and line, never a cell's text (it may be an identifier). Re-exported by `xbmd_batch.metadata`.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from xbmd_batch.errors import InputError

__all__ = ["TableInfo", "read_table", "read_table_info"]

_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_COMMA_DECIMAL = re.compile(r"^\s*[+-]?\d+,\d+\s*$")
_POINT_DECIMAL = re.compile(r"^\s*[+-]?\d*\.\d+\s*$")
_FIX_ENCODING = "save it as UTF-8 (Excel: 'CSV UTF-8'; or `iconv -f cp1252 -t utf-8 in.csv > out.csv`)"


@dataclass(frozen=True)
class TableInfo:
    """How a metadata table was read: what the sniffing decided and where each data row starts.

    ``row_lines[i]`` is the 1-based line of the file where data row ``i`` starts (text tables), so messages
    can name a line a user finds in an editor. ``short_rows`` maps data rows that had fewer cells than the
    header to the number of cells they had: their absent cells are reported as invalid, not silently missing.
    """

    path: str
    format: str  # "csv" | "parquet"
    separator: str | None = None
    decimal_mark: str = "."
    encoding: str | None = None
    row_lines: tuple[int, ...] | None = None
    short_rows: dict[int, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.format == "parquet":
            return "parquet"
        sep = _SEPARATORS.get(self.separator or ",", repr(self.separator))
        return f"{sep}-separated, decimal {'comma' if self.decimal_mark == ',' else 'point'}, {self.encoding}"

    def line_of(self, row: int) -> int | None:
        if self.row_lines is None or not 0 <= row < len(self.row_lines):
            return None
        return self.row_lines[row]


def _decode_text(raw: bytes, p: Path) -> tuple[str, str]:
    """Bytes -> text: UTF-8 (BOM or not) and UTF-16 (Excel "Unicode text") are read; binary is refused."""
    if raw.startswith(codecs.BOM_UTF8):
        raw, enc = raw[len(codecs.BOM_UTF8) :], "utf-8-sig"
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError as e:
            raise InputError(f"{p}: starts with a UTF-16 byte-order mark but is not valid UTF-16 text") from e
    else:
        enc = "utf-8"
        head = raw[:4096]
        if len(head) >= 4 and head.count(0) >= len(head) // 4:
            even, odd = head[0::2].count(0), head[1::2].count(0)
            codec = "utf-16-le" if odd > 0.3 * len(head) / 2 and even == 0 else None
            codec = "utf-16-be" if even > 0.3 * len(head) / 2 and odd == 0 else codec
            if codec is not None:
                try:
                    return raw.decode(codec), codec
                except UnicodeDecodeError:
                    pass
            raise InputError(f"{p}: not a text table (binary content); META must be CSV, TSV or parquet")
    ctrl = sum(1 for b in raw[:65536] if b < 0x20 and b not in (0x09, 0x0A, 0x0D)) + raw[:65536].count(0x7F)
    if ctrl > max(2, len(raw[:65536]) // 100):
        raise InputError(f"{p}: not a text table (binary content); META must be CSV, TSV or parquet")
    try:
        return raw.decode("utf-8"), enc
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"{p}: not UTF-8 text (first undecodable byte on line {line}; Latin-1 / Windows-1252?): "
            + _FIX_ENCODING
        ) from e


def _sniff_separator(header_line: str, ext: str) -> str:
    counts = {s: header_line.count(s) for s in _SEPARATORS}
    best = max(counts.values())
    if best == 0:
        return "\t" if ext in (".tsv", ".tab") else ","
    preferred = "\t" if ext in (".tsv", ".tab") else ","
    if counts[preferred] == best:
        return preferred
    return max(counts, key=lambda s: counts[s])


def _csv_error(p: Path, line: int, e: csv.Error) -> InputError:
    """A csv.Error as a message naming the line, never the cell text (it may be an identifier)."""
    msg = str(e)
    if "unexpected end of data" in msg or "EOF" in msg:
        what = "a quoted cell starts here and its closing quote is missing (unclosed quote)"
    elif "expected after" in msg:
        what = "malformed quoting (text right after a closing quote)"
    elif "NUL" in msg:
        what = "contains NUL bytes (binary content?)"
    else:
        what = f"cannot parse this row ({msg.split(':')[0][:80]})"
    return InputError(f"{p}: line {line}: {what}")


def _read_text(p: Path, subject_key: str) -> tuple[pl.DataFrame, TableInfo]:
    text, encoding = _decode_text(p.read_bytes(), p)
    notes: list[str] = []
    line0 = 0  # lines consumed before the header
    sep: str | None = None
    first, _, rest = text.partition("\n")
    m = re.fullmatch(r"\s*sep=(.)\s*", first.rstrip("\r"))
    if m:  # Excel's separator directive
        sep, text, line0 = m.group(1), rest, 1
        notes.append(f"Excel 'sep={sep}' first line honoured")
    if not text.strip():
        raise InputError(f"{p}: metadata table is empty")
    if sep is None:
        sep = _sniff_separator(text.partition("\n")[0], p.suffix.lower())
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)  # a 10 MB cell is a bad cell to report, not a parser crash
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        for r in reader:
            if r:  # blank lines are skipped
                rows.append(r)
                lines.append(start + line0)
            start = reader.line_num + 1
    except csv.Error as e:
        raise _csv_error(p, start + line0, e) from None
    if not rows:
        raise InputError(f"{p}: metadata table is empty")
    header = [h.strip() for h in rows[0]]
    header = [h or f"column_{i + 1}" for i, h in enumerate(header)]
    _check_duplicate_columns(p, header)
    n = len(header)
    data, short, long_rows = rows[1:], {}, []
    cols: list[list[str | None]] = [[] for _ in range(n)]
    for i, r in enumerate(data):
        if len(r) > n:
            if any(c.strip() for c in r[n:]):
                long_rows.append(lines[i + 1])
                continue
            r = r[:n]
        if len(r) < n:
            short[i] = len(r)
        for j in range(n):
            cols[j].append(r[j] if j < len(r) else None)
    if long_rows:
        more = f" (+{len(long_rows) - 10} more)" if len(long_rows) > 10 else ""
        raise InputError(
            f"{p}: line(s) {', '.join(map(str, long_rows[:10]))}{more} have more cells than the header's {n} "
            f"({_SEPARATORS.get(sep, repr(sep))}-separated): an unquoted separator inside a cell? Quote that "
            "cell or remove the extra separator"
        )
    df = pl.DataFrame(
        {h: c for h, c in zip(header, cols, strict=True)}, schema={h: pl.String for h in header}
    )
    decimal = "."
    if sep != ",":
        df, decimal = _decimal_commas(p, df, subject_key, lines[1:])
        if decimal == ",":
            notes.append("decimal commas read as decimal points")
    info = TableInfo(str(p), "csv", sep, decimal, encoding, tuple(lines[1:]), short, tuple(notes))
    return df, info


_CSV_FIELD_LIMIT = 1 << 28


def _decimal_commas(
    p: Path, df: pl.DataFrame, subject_key: str, lines: list[int]
) -> tuple[pl.DataFrame, str]:
    """In a ';'/tab-separated table '76,8' is a decimal comma; a table mixing both marks is refused."""
    comma: dict[str, int] = {}
    point: dict[str, int] = {}
    for c in df.columns:
        if c.lower() == subject_key.lower():
            continue
        vals = df.get_column(c).to_list()
        for i, v in enumerate(vals):
            if v is None:
                continue
            if c not in comma and _COMMA_DECIMAL.match(v):
                comma[c] = i
            elif c not in point and _POINT_DECIMAL.match(v):
                point[c] = i
    if not comma:
        return df, "."
    if point:
        (cc, ci), (pc, pi) = next(iter(comma.items())), next(iter(point.items()))
        raise InputError(
            f"{p}: mixes decimal commas (column '{cc}', line {lines[ci]}) and decimal points (column '{pc}', "
            f"line {lines[pi]}): re-export it with one decimal mark"
        )
    fix = [
        pl.when(pl.col(c).str.contains(_COMMA_DECIMAL.pattern))
        .then(pl.col(c).str.replace(",", ".", literal=True))
        .otherwise(pl.col(c))
        .alias(c)
        for c in comma
    ]
    return df.with_columns(fix), ","


def _check_duplicate_columns(p: Path, names: list[str]) -> None:
    seen: dict[str, str] = {}
    for c in names:
        k = c.strip().lower()
        if k in seen:
            same = "twice" if seen[k] == c else f"as '{seen[k]}' and '{c}' (differing only in case)"
            raise InputError(f"{p}: column '{c}' appears {same}: ambiguous; rename or drop one of them")
        seen[k] = c


def read_table_info(
    path: str | os.PathLike[str], *, subject_key: str = "subject_id"
) -> tuple[pl.DataFrame, TableInfo]:
    """Read CSV / TSV / parquet and say how (separator, decimal mark, encoding, row lines, short rows).

    Text tables: UTF-8 (BOM or not) or UTF-16; separator sniffed from the header line (comma, semicolon,
    tab, pipe) unless an Excel ``sep=X`` first line names it; in semicolon/tab tables, decimal commas
    ("76,8") are read as decimal points (a table mixing both marks is refused). Every column is a string:
    ``validate_and_encode`` parses cells, so a stray "n/a" is reported per cell. Rows with more cells than
    the header are refused naming their lines; rows with fewer keep their absent cells as invalid (see
    ``TableInfo.short_rows``). Messages never quote cell text (it may be an identifier). The key column is
    found case-insensitively and renamed to ``subject_key``.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: metadata table is a directory, not a file")
    if not p.is_file():
        raise InputError(f"{p}: metadata table not found")
    try:
        with open(p, "rb") as fh:
            is_parquet = fh.read(4) == b"PAR1"
        if is_parquet:
            try:
                df = pl.read_parquet(p)
            except Exception as e:  # noqa: BLE001 - any reader failure is the user's file problem
                raise InputError(f"{p}: cannot read parquet metadata table ({type(e).__name__})") from None
            df = df.rename({c: c.strip() for c in df.columns if c != c.strip()})
            _check_duplicate_columns(p, df.columns)
            info = TableInfo(str(p), "parquet")
        else:
            df, info = _read_text(p, subject_key)
    except OSError as e:
        raise InputError(f"{p}: cannot read metadata table ({e.strerror or e})") from None
    if df.height == 0:
        raise InputError(f"{p}: metadata table has no rows")
    matches = [c for c in df.columns if c.lower() == subject_key.lower()]
    if not matches:
        hint = ""
        if len(df.columns) == 1:
            hint = " - only one column was found: is the separator one of , ; tab |?"
        raise InputError(
            f"{p}: metadata table has no '{subject_key}' column (columns: {', '.join(df.columns[:20])}){hint}"
        )
    key = matches[0]
    kdt = df.schema[key]
    if kdt.is_nested() or kdt == pl.Object:
        raise InputError(f"{p}: key column '{key}' holds {kdt} cells, not one value per row")
    df = df.with_columns(pl.col(key).cast(pl.Utf8).str.strip_chars()).rename(
        {key: subject_key} if key != subject_key else {}
    )
    return df, info


def read_table(path: str | os.PathLike[str], *, subject_key: str = "subject_id") -> pl.DataFrame:
    """Read CSV / TSV / parquet with the subject key as a string (see ``read_table_info``)."""
    return read_table_info(path, subject_key=subject_key)[0]
