"""Records to predict: from JSONL files or a folder (the predict pipeline, the CLI) and from HTTP
requests (the served model). Same contract as training records, without the label:

  image         path (relative to the JSONL file's folder) or, in a request, base64 file bytes
  dataset_name  the label space to predict in; may be left out when the model has one, and a row
                without it is otherwise predicted in every label space the model knows (a row each)
  label         ignored
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from food_multids.data.collator import load_rgb
from food_multids.data.records import (
    MAX_LISTED_PROBLEMS,
    PROBLEM_COLUMNS,
    RecordError,
    check_image_files,
    format_problems,
    image_shape_problem,
    read_jsonl,
)

NO_LABEL = -100  # cross_entropy's ignore_index: an unlabelled row adds nothing to the loss sums
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# image: what the model reads (a path, or a decoded request image); image_ref: what the output names it by.
RECORD_COLUMNS = ["row", "image", "image_ref", "dataset_name", "dataset_id", "num_classes", "label", "sample_id"]


class BadRequest(ValueError):
    """Rows of a served request that cannot be predicted; the message names each row and its problem."""


def _spaces_for(name: str | None, spaces: dict[str, tuple[int, int]]) -> list[str] | str:
    """The label spaces a row is predicted in, or the problem with its dataset_name."""
    if name is None or name == "" or (not isinstance(name, str | list | tuple | dict) and pd.isna(name)):
        return list(spaces)  # one space: that one; several: each of them
    if not isinstance(name, str) or name not in spaces:
        close = difflib.get_close_matches(str(name), list(spaces), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{name!r} is not a label space of the model{hint}, which knows {', '.join(spaces)}"
    return [name]


def _expand(rows: list[tuple[int, object, str, list[str]]], spaces: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """(row, image, image_ref, spaces) -> one record per (row, space), labelled NO_LABEL."""
    out = [(row, image, ref, name) for row, image, ref, names in rows for name in names]
    images = np.empty(len(out), dtype=object)  # filled one by one: numpy would unpack PIL images into pixels
    images[:] = [image for _, image, _, _ in out]
    names = [name for _, _, _, name in out]
    # One frame from typed columns (a served request builds one per request: this is on its path).
    return pd.DataFrame({
        "row": np.array([row for row, _, _, _ in out], dtype=np.int64), "image": images,
        "image_ref": [ref for _, _, ref, _ in out], "dataset_name": names,
        "dataset_id": np.array([spaces[n][0] for n in names], dtype=np.int64),
        "num_classes": np.array([spaces[n][1] for n in names], dtype=np.int64),
        "label": np.full(len(out), NO_LABEL, dtype=np.int64), "sample_id": np.arange(len(out), dtype=np.int64)},
        columns=RECORD_COLUMNS)


def list_images(folder: Path) -> list[Path]:
    """Every image file below `folder` (by suffix), sorted, so a run is repeatable."""
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def records_from_files(jsonl_files: Sequence[Path], image_paths: Sequence[Path], dataset_name: str | None,
                       spaces: dict[str, tuple[int, int]], *, on_bad_rows: str = "error",
                       max_image_pixels: int | None = None, check_workers: int = 8,
                       bad_rows_setting: str = "predict.on_bad_rows=skip",
                       pixels_setting: str = "predict.max_image_pixels") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Records to predict and the rejected rows (split, file, line, reason, detail).

    Rows are checked as training rows are (JSON, image field, file header, truncation, the pixel cap);
    with on_bad_rows=error any problem raises RecordError listing them as file:LINE.
    """
    problems: list[tuple] = []
    rows: list[tuple[str, list[str]]] = []  # (image path, its label spaces)
    where: list[tuple[str, int]] = []  # (file, line) of each row, for its problems
    for path in jsonl_files:
        parsed = read_jsonl(Path(path))
        problems += [("predict", str(path), line, reason, detail) for line, reason, detail in parsed.parse_problems]
        images = parsed.image.cast(pa.string()).to_pylist() if not pa.types.is_null(parsed.image.type) \
            else [None] * parsed.num_rows
        names = parsed.dataset_name.to_pylist()
        for image, name, line in zip(images, names, parsed.line.tolist(), strict=True):
            if not image:
                problems.append(("predict", str(path), line, "missing image", "no 'image' (or 'image_path') field"))
                continue
            wanted = _spaces_for(name if name is not None else dataset_name, spaces)
            if isinstance(wanted, str):
                problems.append(("predict", str(path), line, "unknown dataset_name", wanted))
                continue
            resolved = image if os.path.isabs(image) else os.path.normpath(os.path.join(Path(path).parent, image))
            rows.append((resolved, wanted))
            where.append((str(path), line))
    for image in image_paths:
        wanted = _spaces_for(dataset_name, spaces)
        if isinstance(wanted, str):
            raise RecordError(f"params:predict.dataset_name (or --dataset): {wanted}")
        rows.append((str(image), wanted))
        where.append((str(image), 0))
    if rows:
        found = check_image_files([image for image, _ in rows], check_workers, "checking images", max_image_pixels,
                                  pixels_setting)
        bad = {i for i, f in enumerate(found) if f is not None}
        for i in sorted(bad):
            problems.append(("predict", *where[i], "bad image file", f"{found[i]}: {rows[i][0]}"))
        rows = [r for i, r in enumerate(rows) if i not in bad]
    rejected = pd.DataFrame(problems, columns=PROBLEM_COLUMNS)
    if len(rejected) and on_bad_rows == "error":
        raise RecordError(format_problems(rejected, f"{len(rejected)} bad input row(s) (drop them with "
                                                     f"{bad_rows_setting}):"))
    if not rows:
        sources = [str(p) for p in jsonl_files] + ([f"{len(image_paths)} image file(s)"] if image_paths else [])
        if not len(rejected):
            raise RecordError(f"no images to predict in {', '.join(sources) or 'no input'}: the files hold no rows")
        raise RecordError(format_problems(rejected, f"no images left to predict in {', '.join(sources)}: every row "
                                                    "was rejected"))
    # `row`: the position of the input among those predicted (rejected rows are in the rejected table).
    return _expand([(i, image, image, wanted) for i, (image, wanted) in enumerate(rows)], spaces), rejected


# -- served requests ----------------------------------------------------------------------------------
def read_header(value: object, max_image_pixels: int) -> tuple[bytes, int]:
    """base64 file bytes -> (the bytes, the image's pixel count), from the header alone: refuses what
    would hurt the server before any pixel is decoded. Raises ValueError saying what is wrong."""
    if not isinstance(value, str | bytes) or not value:
        raise ValueError("no image: 'image' must be the base64-encoded bytes of an image file")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"'image' is not valid base64 ({exc}; line breaks or a 'data:' prefix are not "
                         "accepted: encode with `base64 -w0` or Python's base64.b64encode)") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:  # reads the header only
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large ({exc})") from None
    except Exception as exc:  # PIL raises several types for bytes that are not an image
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc}; {len(raw)} bytes)") from None
    shape = image_shape_problem(width, height)
    if shape:
        raise ValueError(shape)
    if width * height > max_image_pixels:
        raise ValueError(f"image too large: {width}x{height} = {width * height / 1e6:.1f} M pixels > "
                         f"predict.max_image_pixels {max_image_pixels / 1e6:.1f} M")
    return raw, width * height


def decode_image(raw: bytes) -> Image.Image:
    try:
        return load_rgb(io.BytesIO(raw))
    except Exception as exc:  # truncated or corrupt pixel data
        raise ValueError(f"image cannot be decoded ({type(exc).__name__}: {exc})") from None


def records_from_request(request: pd.DataFrame, spaces: dict[str, tuple[int, int]], max_image_pixels: int,
                         max_request_pixels: int | None = None) -> pd.DataFrame:
    """A served request (columns image, optional dataset_name) -> records with decoded images.

    Any bad row fails the whole request (BadRequest naming every bad row): a client never has to look
    for error fields in a 200 answer. Headers are read first: a request whose images hold more than
    `max_request_pixels` together is refused before any is decoded (decoded, each pixel takes 3 bytes).
    """
    if len(request) == 0:
        raise BadRequest("the request has no rows")
    if "image" not in request.columns:
        raise BadRequest(f"the request has no 'image' column (columns: {', '.join(map(str, request.columns))})")
    names = request["dataset_name"].tolist() if "dataset_name" in request.columns else [None] * len(request)
    headers, problems = [], []
    for i, (value, name) in enumerate(zip(request["image"].tolist(), names, strict=True)):
        wanted = _spaces_for(name, spaces)
        if isinstance(wanted, str):
            problems.append(f"row {i}: unknown dataset_name: {wanted}")
            continue
        try:
            raw, pixels = read_header(value, max_image_pixels)
        except ValueError as exc:
            problems.append(f"row {i}: {exc}")
            continue
        headers.append((i, raw, pixels, value, wanted))
    total = sum(h[2] for h in headers)
    if not problems and max_request_pixels is not None and total > max_request_pixels:
        raise BadRequest(f"request too large: its {len(headers)} image(s) hold {total / 1e6:.1f} M pixels together > "
                         f"predict.max_request_pixels {max_request_pixels / 1e6:.1f} M: send fewer rows per request")
    rows = []
    for i, raw, _, value, wanted in ([] if problems else headers):
        try:
            image = decode_image(raw)
        except ValueError as exc:
            problems.append(f"row {i}: {exc}")
            continue
        digest = hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()[:16]
        rows.append((i, image, f"sha256:{digest}", wanted))
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = [f"... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
        raise BadRequest("\n".join([f"{len(problems)} of {len(request)} row(s) cannot be predicted; nothing was "
                                    "predicted:", *shown, *more]))
    return _expand(rows, spaces)
