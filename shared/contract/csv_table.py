"""Reading a site's CSV files (clinical.csv, manifest.csv) so that every bad export is named.

The contract is comma-separated UTF-8 text with a header row and decimal points. What spreadsheet
exports commonly produce instead is recognised and refused with the fix, never guessed at:

- a UTF-8 byte-order mark (Excel's "CSV UTF-8") is accepted silently;
- semicolon- or tab-separated files (Excel in locales with a decimal comma) are refused as a whole:
  guessing the delimiter would also mean guessing which commas are decimal separators, and a
  mis-guess silently changes numbers. The message says to export comma-separated values with
  decimal points; a decimal comma inside a quoted value is named where it occurs;
- an Excel workbook renamed .csv (zip "PK\\x03\\x04", or the older OLE2 .xls) is named as such;
- UTF-16 text (a UTF-16 byte-order mark, or a zero byte beside every character: Excel's
  "Unicode Text", Notepad's "Unicode") is refused as UTF-16, with the fix (re-save as UTF-8);
- other bytes that are not UTF-8 (a Latin-1 / Windows-1252 export) are refused, naming the line;
- a row with more or fewer fields than the header is refused, naming the line;
- an empty file is refused; blank lines (and rows of empty fields) are skipped.

The table's index holds each row's line number in the file (line 1 is the header), so findings
name the line a person sees in an editor even when blank lines or quoted line breaks occur.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from spine_fl.shared.contract.report import ValidationReport

MAX_CSV_BYTES = 256 * 2**20  # a per-patient table is kilobytes to megabytes; anything larger is a wrong file
ZIP_MAGIC = b"PK\x03\x04"  # .xlsx (and any zip)
OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # legacy .xls
SAVE_AS_CSV = "in Excel use Save As -> 'CSV UTF-8 (comma delimited)'"


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # little- and big-endian (Excel's "Unicode Text", Notepad's "Unicode")


def _utf16(raw: bytes) -> str | None:
    """"UTF-16" when the bytes are UTF-16 text: a UTF-16 byte-order mark, or (without one) ASCII text
    with a zero byte beside every character; None otherwise."""
    if raw.startswith(UTF16_BOMS):
        return "UTF-16 (it starts with a UTF-16 byte-order mark)"
    head = raw[:4096]
    even, odd = head[0::2], head[1::2]
    if len(odd) >= 2 and ((odd.count(0) > 0.9 * len(odd) and even.count(0) < 0.1 * len(even))
                          or (even.count(0) > 0.9 * len(even) and odd.count(0) < 0.1 * len(odd))):
        return "UTF-16 (every other byte is zero)"
    return None


def _decode(path: Path, raw: bytes, report: ValidationReport) -> str | None:
    """UTF-8 text with a leading byte-order mark removed, or an error naming the first bad line."""
    wide = _utf16(raw)
    if wide:
        report.error(f"{path} line 1", f"the file is {wide}, not UTF-8 text",
                     f"re-save the file as UTF-8: {SAVE_AS_CSV} (not 'Unicode Text')")
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        report.error(f"{path} line {line}", f"byte 0x{raw[exc.start]:02x} is not UTF-8 text (the file looks like a "
                     "Latin-1 / Windows-1252 export)", f"save the file as UTF-8: {SAVE_AS_CSV}")
        return None


def _records(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, fields) for every record, blank lines included as empty lists."""
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    records = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return records
        records.append((start, fields))


def read_csv_table(path: Path, report: ValidationReport, purpose: str) -> pd.DataFrame | None:
    """The table as strings, indexed by line number; None (after an error naming why) when unreadable."""
    if path.is_dir():
        report.error(str(path), "is a folder, not a file", f"export the {purpose} as {path.name} into the site folder")
        return None
    if not path.is_file():
        what = "not a regular file (a pipe, socket or device)" if path.exists() else "file missing"
        report.error(str(path), what, f"export the {purpose} as {path.name} into the site folder")
        return None
    try:
        if path.stat().st_size > MAX_CSV_BYTES:
            report.error(str(path), f"{path.stat().st_size / 2**20:.0f} MiB is far larger than a table of patients "
                         f"(limit {MAX_CSV_BYTES >> 20} MiB)", f"check that this is the {purpose}")
            return None
        raw = path.read_bytes()
    except OSError as exc:
        report.error(str(path), f"cannot be read ({exc.strerror})", "check the file's permissions")
        return None
    if raw.startswith(ZIP_MAGIC) or raw.startswith(OLE2_MAGIC):
        report.error(str(path), "an Excel workbook (or other archive) saved under a .csv name, not CSV text",
                     f"open it in Excel and {SAVE_AS_CSV.removeprefix('in Excel ')}")
        return None
    if not raw.strip(b" \t\r\n\xef\xbb\xbf"):
        report.error(str(path), "file is empty", f"export the {purpose} with a header row and one row per line")
        return None
    text = _decode(path, raw, report)
    if text is None:
        return None
    try:
        records = _records(text)
    except csv.Error as exc:
        report.error(str(path), f"not readable as CSV ({exc})", f"save it as comma-separated UTF-8 text: {SAVE_AS_CSV}")
        return None
    records = [(line, fields) for line, fields in records if any(f.strip() for f in fields)]
    header_line, header = records[0]
    header = [h.strip() for h in header]
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        separator = "semicolons (';')" if ";" in header[0] else "tabs"
        report.error(f"{path} line {header_line}", f"columns are separated by {separator}, not commas",
                     "export as comma-separated values with decimal points (7.5, not 7,5): "
                     f"{SAVE_AS_CSV}, with the system list separator set to ','")
        return None
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    if repeated:
        report.error(f"{path} line {header_line}", f"column(s) {', '.join(repeated)} appear more than once in the header",
                     "keep one column of each name")
        return None
    rows, lines = [], []
    for line, fields in records[1:]:
        if len(fields) != len(header):
            report.error(f"{path} line {line}", f"{len(fields)} fields, but the header has {len(header)}",
                         "a value holds an unquoted comma, or the row is cut short: quote values that contain "
                         "commas and export the table again")
            continue
        rows.append(fields)
        lines.append(line)
    return pd.DataFrame(rows, columns=header, index=pd.Index(lines, name="line"), dtype=str)
