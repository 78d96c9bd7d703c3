"""Served requests: every bad row is refused with a message naming it, before any pixel is decoded
where the header already says no."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pandas as pd
import pytest
from PIL import Image

from food_multids.inference.inputs import BadRequest, records_from_request

SPACES = {"digits": (0, 10), "shapes": (1, 40)}


def png_bytes(size=(56, 56), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def with_header_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming another size (valid CRC): a decompression bomb's header."""
    start = 8 + 8  # signature, then IHDR's length and type
    ihdr = struct.pack(">II", width, height) + png[start + 8:start + 13]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return png[:start] + ihdr + crc + png[start + 17:]


BAD = {
    "undecodable base64": ("%%% not base64 %%%", "digits", "row 0: 'image' is not valid base64"),
    "not an image": (b64(b"just some text, no image"), "digits", "row 0: not a readable image"),
    "truncated image": (b64(png_bytes((300, 300), (1, 2, 3))[:-40]), "digits", "row 0: image cannot be decoded"),
    "over the pixel cap": (b64(png_bytes((1200, 1000))), "digits",
                           "row 0: image too large: 1200x1000 = 1.2 M pixels > predict.max_image_pixels 1.0 M"),
    "past Pillow's bomb limit": (b64(with_header_size(png_bytes(), 30000, 30000)), "digits", "row 0: image too large"),
    "extreme aspect ratio": (b64(png_bytes((300, 1))), "digits", "row 0: aspect ratio 300 (300x1) exceeds 200"),
    "unknown dataset": (b64(png_bytes()), "food101",
                        "row 0: unknown dataset_name: 'food101' is not a label space of the model, which knows "
                        "digits, shapes"),
    "missing image": (None, "digits", "row 0: no image"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_kind_of_bad_row_is_refused_with_its_row_and_problem(kind):
    image, dataset, expected = BAD[kind]
    request = pd.DataFrame({"image": [image, b64(png_bytes())], "dataset_name": [dataset, "digits"]})
    with pytest.raises(BadRequest) as err:
        records_from_request(request, SPACES, max_image_pixels=1_000_000)
    assert expected in str(err.value)
    assert "1 of 2 row(s) cannot be predicted" in str(err.value) and "row 1" not in str(err.value)


def test_the_bomb_is_refused_from_its_header_without_decoding_pixels():
    # 30000 x 30000 RGB would be 2.7 GB decoded; the file is a few hundred bytes.
    bomb = with_header_size(png_bytes(), 30000, 30000)
    assert len(bomb) < 1000
    with pytest.raises(BadRequest, match="image too large"):
        records_from_request(pd.DataFrame({"image": [b64(bomb)]}), SPACES, max_image_pixels=64_000_000)


def test_a_request_without_the_image_column_is_refused():
    with pytest.raises(BadRequest, match="the request has no 'image' column"):
        records_from_request(pd.DataFrame({"dataset_name": ["digits"]}), SPACES, 1_000_000)


def test_an_empty_request_says_it_has_no_rows_and_the_schema_lets_it_through():
    from food_multids.pipelines.predict.serving import signature

    with pytest.raises(BadRequest, match="the request has no rows"):
        records_from_request(pd.DataFrame(), SPACES, 1_000_000)  # {"dataframe_records": []}
    # MLflow enforces the logged schema before the model runs: a required image column would answer
    # "missing inputs ['image']" to an empty request instead.
    assert signature().inputs.required_input_names() == []


def test_mlflows_schema_check_lets_wrongly_typed_rows_reach_our_message():
    from mlflow.models.utils import _enforce_schema

    from food_multids.pipelines.predict.serving import signature

    request = pd.DataFrame({"image": [12345, b64(png_bytes())], "dataset_name": ["digits", 7]})
    passed = _enforce_schema(request, signature().inputs)  # a typed schema raises "Failed to enforce schema of data"
    with pytest.raises(BadRequest) as info:
        records_from_request(passed, SPACES, 1_000_000)
    message = str(info.value)
    assert "row 0: no image: 'image' must be the base64-encoded bytes" in message
    assert "row 1: unknown dataset_name: 7 is not a label space" in message and "iVBOR" not in message  # no dump


def test_good_rows_are_decoded_and_a_row_without_dataset_goes_to_every_space():
    request = pd.DataFrame({"image": [b64(png_bytes()), b64(png_bytes(colour=(0, 0, 255)))],
                            "dataset_name": ["shapes", None]})
    records = records_from_request(request, SPACES, 1_000_000)
    assert list(zip(records["row"], records["dataset_name"], records["num_classes"], strict=True)) == [
        (0, "shapes", 40), (1, "digits", 10), (1, "shapes", 40)]
    assert records["sample_id"].is_unique and (records["label"] == -100).all()
    assert all(isinstance(i, Image.Image) and i.mode == "RGB" for i in records["image"])
    assert records["image_ref"].str.startswith("sha256:").all()


def test_a_request_over_the_total_pixel_cap_is_refused_before_decoding():
    big = b64(png_bytes((1000, 1000)))
    with pytest.raises(BadRequest, match=r"request too large: its 3 image\(s\) hold 3.0 M pixels together > "
                                         r"predict.max_request_pixels 2.5 M: send fewer rows per request"):
        records_from_request(pd.DataFrame({"image": [big] * 3}), SPACES, 1_000_000, max_request_pixels=2_500_000)
    assert len(records_from_request(pd.DataFrame({"image": [big] * 2}), SPACES, 1_000_000, 2_500_000)) == 4


def test_a_missing_dataset_name_of_any_null_kind_means_every_space():
    request = pd.DataFrame({"image": [b64(png_bytes())] * 3, "dataset_name": pd.array([pd.NA, None, "digits"],
                                                                                      dtype=object)})
    records = records_from_request(request, SPACES, 1_000_000)
    assert list(records["dataset_name"]) == ["digits", "shapes", "digits", "shapes", "digits"]
