"""Read and validate the JSONL record files.

Record contract, one JSON object per line (blank lines ignored):
  image        path to the image; relative paths resolve against the JSONL file's folder
               (`image_path` is accepted as the same field)
  label        integer, 0-based, below the dataset's num_classes
  dataset_name a configured dataset (optional when the file maps to one dataset)
  label_name   optional human-readable class name

Files are parsed with pyarrow (about 6x faster than a json.loads loop); a file pyarrow rejects is
re-read line by line so every problem is reported as `file:LINE: what (value)`.
"""

from __future__ import annotations

import codecs
import difflib
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from food_multids.helpers.progress import progress

PROBLEM_COLUMNS = ["split", "file", "line", "reason", "detail"]
MAX_LISTED_PROBLEMS = 20
MAX_PER_REASON = 5  # rows listed per reason of a bad-rows error
TOO_LARGE = "image too large"
MAX_ASPECT_RATIO = 200  # qwen-vl-utils' resize rules refuse more extreme images


class RecordError(ValueError):
    """Bad input rows under on_bad_rows=error, or a file with no usable rows."""


@dataclass
class FileRows:
    """One file's rows before validation: raw column arrays and the 1-based line of each row."""

    path: Path
    image: pa.Array
    label: pa.Array | list  # a list of JSON values when parsed line by line
    dataset_name: pa.Array
    label_name: pa.Array
    line: np.ndarray
    parse_problems: list[tuple[int, str, str]]  # (line, reason, detail)

    @property
    def num_rows(self) -> int:
        return len(self.line)


def format_problems(problems: pd.DataFrame, header: str) -> str:
    """`header`, then the problems grouped by reason (most frequent first), each group's first
    MAX_PER_REASON as `file:LINE: reason: detail` (no line where the file is itself the row: an image of a
    folder) and how many more: 19 duplicate rows never hide the one truncated image."""
    ordered = problems.sort_values(["split", "file", "line"])
    counts = ordered["reason"].value_counts()
    reasons = sorted(counts.index, key=lambda reason: (-counts[reason], reason))
    lines = [header, "by reason: " + ", ".join(f"{counts[reason]} {reason}" for reason in reasons)]
    for reason in reasons:
        group = ordered[ordered["reason"] == reason]
        lines += [f"{r.file}{f':{r.line}' if r.line else ''}: {reason}: {r.detail}"
                  for r in group.head(MAX_PER_REASON).itertuples()]
        if len(group) > MAX_PER_REASON:
            lines.append(f"... and {len(group) - MAX_PER_REASON} more {reason}")
    return "\n  ".join(lines)


# -- parsing ----------------------------------------------------------------------------------------
def _line_numbers(data: bytes, expected_rows: int) -> np.ndarray | None:
    """1-based numbers of the non-blank lines of `data`, or None when they do not match pyarrow's rows."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(buf)]))
    lengths = ends - starts
    nonblank = lengths > 0
    if nonblank.sum() != expected_rows:
        # Lines of only whitespace: count non-whitespace bytes per line (rare, so the slower scan is fine).
        is_text = np.ones(256, dtype=bool)
        is_text[[9, 10, 13, 32]] = False
        text = is_text[buf]
        has_text = np.zeros(len(starts), dtype=bool)
        ok = lengths > 0
        has_text[ok] = np.add.reduceat(text, starts[ok]) > 0 if ok.any() else False
        # Each reduceat segment runs to the next non-empty line's start; what lies between is newlines.
        nonblank = has_text
        if nonblank.sum() != expected_rows:
            return None
    return np.flatnonzero(nonblank) + 1


def _column(table: pa.Table, name: str, n: int) -> pa.Array:
    if name in table.column_names:
        return table.column(name).combine_chunks()
    return pa.nulls(n)


def _read_fast(path: Path, data: bytes) -> FileRows | None:
    try:
        table = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=1 << 24))
    except pa.ArrowInvalid:
        return None
    n = table.num_rows
    lines = _line_numbers(data, n)
    if lines is None:
        return None
    image = _column(table, "image", n)
    if "image_path" in table.column_names:
        paths = table.column("image_path").combine_chunks()
        image = pc.coalesce(image, paths) if "image" in table.column_names else _column(table, "image_path", n)
    return FileRows(path, image, _column(table, "label", n), _column(table, "dataset_name", n),
                    _column(table, "label_name", n), lines, [])


def _read_slow(path: Path, data: bytes) -> FileRows:
    """Line-by-line parse that reports malformed lines; labels keep their JSON values for validation."""
    images, labels, names, label_names, lines, problems = [], [], [], [], [], []
    for number, raw_bytes in enumerate(data.split(b"\n"), start=1):
        if not raw_bytes.strip():
            continue
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw_bytes[exc.start:exc.start + 1]
            problems.append((number, "not UTF-8", f"byte 0x{bad.hex()} at column {exc.start + 1} is not UTF-8: "
                                                  f"{_clip(raw_bytes.decode('utf-8', errors='replace'))}"))
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append((number, "malformed JSON", f"{exc.msg} at column {exc.colno}: {_clip(raw)}"))
            continue
        if not isinstance(row, dict):
            problems.append((number, "malformed JSON", f"expected an object, got {type(row).__name__}: {_clip(raw)}"))
            continue
        image = row.get("image", row.get("image_path"))
        images.append(image if isinstance(image, str) else (None if image is None else json.dumps(image)))
        labels.append(row.get("label"))
        name = row.get("dataset_name")
        names.append(name if name is None or isinstance(name, str) else str(name))
        label_name = row.get("label_name")
        label_names.append(None if label_name is None else str(label_name))
        lines.append(number)
    return FileRows(path, pa.array(images, type=pa.string()), labels, pa.array(names, type=pa.string()),
                    pa.array(label_names, type=pa.string()), np.asarray(lines, dtype=np.int64), problems)


def _clip(text: str, width: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= width else text[: width - 3] + "..."


def read_jsonl(path: Path) -> FileRows:
    """Parse one JSONL file (fast path first, exact line-by-line path when pyarrow rejects it or the
    file is not all UTF-8: pyarrow would pass invalid bytes through to crash a later step)."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):  # written by some editors; not part of the first row
        data = data[len(codecs.BOM_UTF8):]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return _read_slow(path, data)
    rows = _read_fast(path, data)
    return rows if rows is not None else _read_slow(path, data)


# -- validation -------------------------------------------------------------------------------------
_LABEL_LIMIT = 2**62  # beyond any num_classes, and safe in int64 arithmetic


def _label_problem(value: object) -> tuple[str, str] | None:
    """(reason, detail) when `value` is not a usable class index (range is checked later), else None."""
    if value is None:
        return "missing label", "no 'label' field"
    if isinstance(value, str):
        return "non-integer label", (f"label {value!r} is a string: labels are JSON integers (the class index, "
                                     "0-based); put class names in label_name")
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not value.is_integer()):
        return "non-integer label", f"label {value!r} is not an integer"
    if abs(value) >= _LABEL_LIMIT:
        # A JSON integer past int64 reaches us as a float (pyarrow widens the column): print it as an integer.
        return "label out of range", f"label {int(value)} is beyond any num_classes"
    return None


def _labels_as_int(label: pa.Array | list) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str] | None]]:
    """(values, valid mask, per-row (reason, detail) or None). One rule for every input: JSON integers
    pass (3.0 too: pyarrow widens a column to double when any row has a fraction); strings never do."""
    if isinstance(label, pa.Array) and pa.types.is_integer(label.type):
        valid = ~np.asarray(label.is_null().to_numpy(zero_copy_only=False))
        values = label.fill_null(-1).to_numpy().astype(np.int64)
        reasons: list[tuple[str, str] | None] = [None] * len(label)
        for i in np.flatnonzero(~valid | (np.abs(values) >= _LABEL_LIMIT)):
            reasons[i] = _label_problem(None if not valid[i] else int(values[i]))
        return values, np.array([r is None for r in reasons], dtype=bool), reasons
    raw = label.to_pylist() if isinstance(label, pa.Array) else label
    reasons = [_label_problem(v) for v in raw]
    valid = np.array([r is None for r in reasons], dtype=bool)
    values = np.array([int(v) if ok else -1 for v, ok in zip(raw, valid, strict=True)], dtype=np.int64)
    return values, valid, reasons


def validate_file(rows: FileRows, num_classes: dict[str, int], default_name: str | None, file_index: int = 0
                  ) -> tuple[pa.Table, list[tuple[int, str, str]]]:
    """Check labels and dataset names of one file; return the rows that pass and the problems."""
    n = rows.num_rows
    problems = list(rows.parse_problems)
    bad = np.zeros(n, dtype=bool)

    def flag(mask: np.ndarray, reason: str, detail_of) -> None:
        new = mask & ~bad
        for i in np.flatnonzero(new):
            problems.append((int(rows.line[i]), reason, detail_of(i)))
        bad[new] = True

    image = rows.image if pa.types.is_string(rows.image.type) or pa.types.is_large_string(rows.image.type) \
        else rows.image.cast(pa.string()) if not pa.types.is_null(rows.image.type) else pa.nulls(n, pa.string())
    missing_image = np.asarray(pc.fill_null(pc.equal(pc.utf8_length(image), 0), True).to_numpy(zero_copy_only=False))
    flag(missing_image, "missing image", lambda i: "no 'image' (or 'image_path') field")

    names = rows.dataset_name
    if pa.types.is_null(names.type):
        names = pa.nulls(n, pa.string())
    elif not pa.types.is_string(names.type):
        names = names.cast(pa.string())
    if default_name is not None:
        names = pc.fill_null(names, default_name)
    known = list(num_classes)
    found = pc.index_in(names, value_set=pa.array(known, type=pa.string()))
    ds_index = np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False))
    name_missing = np.asarray(names.is_null().to_numpy(zero_copy_only=False))
    flag(name_missing, "missing dataset_name",
         lambda i: f"no dataset_name and the file maps to none of {known}: add dataset_name to each row")
    name_list = None

    def unknown_detail(i: int) -> str:
        nonlocal name_list
        name_list = name_list or names.to_pylist()
        close = difflib.get_close_matches(str(name_list[i]), known, n=1)
        hint = f", did you mean '{close[0]}'?" if close else f", configured: {known}"
        return f"'{name_list[i]}' is not in datasets.dataset_configs{hint}"

    flag(ds_index < 0, "unknown dataset_name", unknown_detail)

    labels, label_ok, label_reasons = _labels_as_int(rows.label)
    if not label_ok.all():
        for i in np.flatnonzero(~label_ok & ~bad):
            problems.append((int(rows.line[i]), *label_reasons[i]))
        bad |= ~label_ok
    flag(labels < 0, "negative label", lambda i: f"label {labels[i]} is negative")
    limits = np.array([num_classes[k] for k in known], dtype=np.int64)
    row_limit = np.where(ds_index >= 0, limits[np.clip(ds_index, 0, None)], np.iinfo(np.int64).max)
    flag(labels >= row_limit, "label out of range",
         lambda i: f"label {labels[i]} >= num_classes {row_limit[i]} of dataset '{known[ds_index[i]]}'")

    keep = ~bad
    folder = str(rows.path.parent) + os.sep
    is_abs = pc.starts_with(image, os.sep)
    resolved = _normalise_paths(pc.if_else(is_abs, image, pc.binary_join_element_wise(pa.scalar(folder), image, "")))
    label_name = rows.label_name if not pa.types.is_null(rows.label_name.type) else pa.nulls(n, pa.string())
    if not pa.types.is_string(label_name.type):
        label_name = label_name.cast(pa.string())
    # Dictionary-encoded with the configured order: the codes are the dataset ids, and no later step
    # has to hash a million dataset names again.
    dataset_codes = pa.DictionaryArray.from_arrays(pa.array(np.clip(ds_index, 0, None).astype(np.int32)),
                                                   pa.array(known, type=pa.string()))
    columns = {"image": resolved, "label": pa.array(labels), "dataset_name": dataset_codes, "label_name": label_name,
               "line": pa.array(rows.line)}
    table = pa.table(columns)
    if not keep.all():
        table = table.take(pa.array(np.flatnonzero(keep)))
    kept = table.num_rows
    source = pa.DictionaryArray.from_arrays(pa.array(np.zeros(kept, dtype=np.int32)), pa.array([str(rows.path)]))
    table = table.add_column(4, "source_file", source)
    table = table.add_column(5, "file_index", pa.array(np.full(kept, file_index, dtype=np.int16)))
    return table, problems


def _normalise_paths(paths: pa.Array) -> pa.Array:
    """'dir/./a.png', 'dir/x/../a.png' and 'dir//a.png' become 'dir/a.png', so the duplicate and
    train/val overlap checks see one image as one path. Only the rows that need it leave Arrow."""
    needs = pc.fill_null(pc.match_substring_regex(paths, r"(^|/)\.{1,2}(/|$)|//"), False)
    if not pc.any(needs).as_py():
        return paths
    positions = np.flatnonzero(np.asarray(needs.to_numpy(zero_copy_only=False)))
    values = paths.to_pylist()
    for i in positions:
        values[i] = os.path.normpath(values[i])
    return pa.array(values, type=paths.type)


def find_duplicates(table: pa.Table) -> np.ndarray:
    """Positions of rows repeating an earlier (dataset_name, image) pair in the same split."""
    image = table.column("image")
    if len(pc.unique(image)) == table.num_rows:  # the common case, one hash pass
        return np.zeros(table.num_rows, dtype=bool)
    keys = pa.table({"d": table.column("dataset_name"), "i": image, "row": pa.array(np.arange(table.num_rows))})
    first = keys.group_by(["d", "i"], use_threads=False).aggregate([("row", "min")]).column("row_min").to_numpy()
    dup = np.ones(table.num_rows, dtype=bool)
    dup[first] = False
    return dup


def to_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow-backed DataFrame without copying strings; dictionary columns become pandas categoricals
    (parquet round-trips those, not ArrowDtype dictionaries)."""
    return table.to_pandas(types_mapper=lambda t: None if pa.types.is_dictionary(t) else pd.ArrowDtype(t))


# -- image files ------------------------------------------------------------------------------------
_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


def _header_size(kind: str, head: bytes) -> tuple[int, int] | None:
    """(width, height) read from the first bytes of PNG, GIF and BMP files; None for other kinds."""
    if kind == "png" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if kind == "gif" and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if kind == "bmp" and len(head) >= 26:
        width, height = (int.from_bytes(head[a:a + 4], "little", signed=True) for a in (18, 22))
        return width, abs(height)
    return None


def _image_size(path: str, kind: str, head: bytes) -> tuple[int, int]:
    size = _header_size(kind, head)
    if size is not None:
        return size
    from PIL import Image

    with Image.open(path) as img:  # reads the header only (JPEG: up to the frame marker)
        return img.size


def check_image_file(path: str, max_pixels: int | None = None, pixels_setting: str = "data.max_image_pixels"
                     ) -> str | None:
    """Cheap header and end-of-file check; None when the file looks like a whole image.

    Full decoding is the loader's job; this catches missing, empty, non-image and truncated files,
    and (with max_pixels) images too large to decode in reasonable time. `pixels_setting` is the name
    of the cap the user set (a parameter, or a command-line flag), for the message.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
            size = os.fstat(fh.fileno()).st_size
            kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
            if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                kind = "webp"
            if size == 0:
                return "empty image file"
            if kind is None:
                return f"not an image file (header {head[:8]!r})"
            tail_len = min(size, 12)
            fh.seek(size - tail_len)
            tail = fh.read(tail_len)
    except FileNotFoundError:
        return "image file not found"
    except OSError as exc:
        return f"unreadable image file ({exc.strerror or exc})"
    if kind == "jpeg" and not tail.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    if kind == "png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    if kind == "gif" and not tail.endswith(b";"):
        return "truncated GIF (no trailer)"
    if kind == "bmp" and int.from_bytes(head[2:6], "little") > size:
        return "truncated BMP (file shorter than its header says)"
    if kind == "webp" and int.from_bytes(head[4:8], "little") + 8 > size:
        return "truncated WEBP (file shorter than its header says)"
    if max_pixels is not None:
        from PIL import Image

        try:
            width, height = _image_size(path, kind, head)
        except Image.DecompressionBombError as exc:  # past Pillow's own limit: too large by any cap
            return f"{TOO_LARGE} ({exc}; {pixels_setting} {max_pixels / 1e6:.1f} M)"
        except Exception as exc:  # PIL raises many types for a damaged header
            return f"unreadable image header ({type(exc).__name__}: {exc})"
        shape_problem = image_shape_problem(width, height)
        if shape_problem:
            return shape_problem
        if width * height > max_pixels:
            return (f"{TOO_LARGE} ({width}x{height} = {width * height / 1e6:.1f} M pixels > {pixels_setting} "
                    f"{max_pixels / 1e6:.1f} M; resize it or raise the setting)")
    return None


def image_shape_problem(width: int, height: int) -> str | None:
    """What Qwen VL's resize rules refuse (they would fail at every load), or None."""
    if width < 1 or height < 1:
        return f"image has no pixels ({width}x{height})"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"aspect ratio {max(width, height) / min(width, height):.0f} ({width}x{height}) exceeds "
                f"{MAX_ASPECT_RATIO}, which Qwen VL's resize rules refuse")
    return None


def check_image_files(paths: Sequence[str], workers: int, desc: str, max_pixels: int | None = None,
                      pixels_setting: str = "data.max_image_pixels") -> list[str | None]:
    """check_image_file over many paths in threads (the work is file I/O), with a progress bar."""
    if not paths:
        return []
    chunk = 512
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results: list[str | None] = []
        bar = progress(total=len(paths), desc=desc, unit="img")
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            results.extend(pool.map(check_image_file, part, [max_pixels] * len(part), [pixels_setting] * len(part)))
            bar.update(len(part))
        bar.close()
    return results
