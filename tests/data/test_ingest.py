from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from food_multids.config import ProjectConfig
from food_multids.data.ingest import ingest
from food_multids.data.records import RecordError, check_image_file, read_jsonl
from tests.conftest import with_overrides, write_image, write_jsonl


def run_ingest(params):
    return ingest(ProjectConfig.from_params(params))


def corrupt(params, rows_to_append: list, file_index: int = 0, split: str = "train") -> Path:
    path = Path(params["data"][f"{split}_jsonl_list"][file_index])
    with path.open("a") as fh:
        for row in rows_to_append:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def n_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_clean_files_ingest_every_row_with_absolute_image_paths(two_datasets, tmp_path):
    result = run_ingest(two_datasets)
    assert len(result.train) == 3 * 4 + 5 * 4 and len(result.val) == 32
    assert result.rejected.empty
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in result.train["image"])
    assert set(result.train["dataset_name"]) == {"alpha", "beta"}
    expected = {"kept": 20, "dropped": 0, "dropped_by_reason": {}}
    assert result.summary["train"][str(tmp_path / "beta/train.jsonl")] == expected


BAD_ROWS = {
    "malformed JSON": '{"image": "img/train/0_0.png", "label": 1',
    "missing label": {"image": "img/train/0_1.png", "dataset_name": "alpha"},
    "negative label": {"image": "img/train/0_2.png", "label": -1, "dataset_name": "alpha"},
    "non-integer label": {"image": "img/train/0_3.png", "label": 1.5, "dataset_name": "alpha"},
    "label out of range": {"image": "img/train/1_0.png", "label": 3, "dataset_name": "alpha"},
    "unknown dataset_name": {"image": "img/train/1_1.png", "label": 0, "dataset_name": "alpah"},
    "missing image file": {"image": "img/train/nope.png", "label": 0, "dataset_name": "alpha"},
    "duplicate row": {"image": "img/train/0_0.png", "label": 0, "dataset_name": "alpha"},
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_each_bad_row_fails_with_file_and_line_under_error(two_datasets, reason):
    path = corrupt(two_datasets, [BAD_ROWS[reason]])
    with pytest.raises(RecordError) as info:
        run_ingest(two_datasets)
    message = str(info.value)
    assert f"{path}:{n_lines(path)}: {reason}" in message
    assert "1 bad input row(s)" in message


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_each_bad_row_is_dropped_and_recorded_under_skip(two_datasets, reason):
    path = corrupt(two_datasets, [BAD_ROWS[reason]])
    result = run_ingest(with_overrides(two_datasets, data={"on_bad_rows": "skip"}))
    assert len(result.train) == 32
    assert result.rejected[["file", "line", "reason"]].values.tolist() == [[str(path), n_lines(path), reason]]
    assert result.summary["train"][str(path)]["dropped_by_reason"] == {reason: 1}


def test_detail_names_the_offending_value(two_datasets):
    corrupt(two_datasets, [BAD_ROWS["label out of range"], BAD_ROWS["unknown dataset_name"]])
    with pytest.raises(RecordError) as info:
        run_ingest(two_datasets)
    assert "label 3 >= num_classes 3 of dataset 'alpha'" in str(info.value)
    assert "'alpah' is not in datasets.dataset_configs, did you mean 'alpha'?" in str(info.value)


def test_error_groups_rows_by_reason_so_a_rare_one_is_never_hidden(two_datasets):
    rows = [{"image": f"img/train/x{i}.png", "label": 0, "dataset_name": "alpha"} for i in range(25)]
    corrupt(two_datasets, [*rows, BAD_ROWS["label out of range"]])
    with pytest.raises(RecordError) as info:
        run_ingest(two_datasets)
    text = str(info.value)
    assert text.startswith("26 bad input row(s)")
    assert "by reason: 25 missing image file, 1 label out of range" in text
    assert text.count(": missing image file: ") == 5 and "... and 20 more missing image file" in text
    assert ": label out of range: " in text  # the rare reason is shown
    assert "label 3 >= num_classes 3 of dataset 'alpha'" in text


@pytest.mark.parametrize("kind", ["truncated", "not an image", "empty"])
def test_broken_image_files_are_bad_rows(two_datasets, tmp_path, kind):
    target = tmp_path / "alpha/img/train/broken.png"
    if kind == "truncated":
        write_image(target)
        target.write_bytes(target.read_bytes()[:-20])
    elif kind == "not an image":
        target.write_text("hello, not a PNG")
    else:
        target.write_bytes(b"")
    corrupt(two_datasets, [{"image": "img/train/broken.png", "label": 0, "dataset_name": "alpha"}])
    result = run_ingest(with_overrides(two_datasets, data={"on_bad_rows": "skip"}))
    assert result.rejected["reason"].tolist() == ["bad image file"]
    assert {"truncated": "truncated PNG", "not an image": "not an image file", "empty": "empty image file"}[kind] \
        in result.rejected["detail"].iloc[0]


def test_image_check_can_be_switched_off(two_datasets):
    corrupt(two_datasets, [BAD_ROWS["missing image file"]])
    result = run_ingest(with_overrides(two_datasets, data={"check_images": False}))
    assert len(result.train) == 33


@pytest.mark.parametrize("mode,fmt",
                         [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP"),
                          ("RGB", "BMP"), ("RGB", "GIF")])
def test_all_common_modes_and_formats_pass_the_header_check(tmp_path, mode, fmt):
    path = write_image(tmp_path / f"x.{fmt.lower()}", mode=mode, fmt=fmt)
    assert check_image_file(str(path)) is None


def test_empty_file_is_an_error_naming_it(two_datasets):
    path = Path(two_datasets["data"]["val_jsonl_list"][1])
    path.write_text("\n\n")
    with pytest.raises(RecordError, match=f"{path}: file is empty"):
        run_ingest(two_datasets)


def test_file_with_zero_valid_rows_is_an_error_even_under_skip(two_datasets):
    path = Path(two_datasets["data"]["val_jsonl_list"][0])
    write_jsonl(path, [{"image": "a.png", "label": 0, "dataset_name": "alpha"}])
    with pytest.raises(RecordError, match=f"{path}: no valid rows left"):
        run_ingest(with_overrides(two_datasets, data={"on_bad_rows": "skip"}))


def test_configured_dataset_without_rows_is_an_error(two_datasets):
    params = copy.deepcopy(two_datasets)
    params["datasets"]["dataset_configs"]["gamma"] = {"num_classes": 2, "eval_ratio": 0.5}
    with pytest.raises(RecordError, match=r"\['gamma'\] are in datasets.dataset_configs but have no train rows"):
        run_ingest(params)


def test_blank_lines_are_ignored_and_line_numbers_stay_exact(tmp_path):
    write_image(tmp_path / "a.png")
    path = tmp_path / "f.jsonl"
    path.write_text('\n{"image": "a.png", "label": 0}\n   \n\n{"image_path": "a.png", "label": 1}\n')
    rows = read_jsonl(path)
    assert rows.line.tolist() == [2, 5]
    assert rows.image.to_pylist() == ["a.png", "a.png"]


def test_line_numbers_are_exact_when_the_slow_parser_is_needed(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"image": "a.png", "label": 0}\n\n{"image": "a.png", "label": "x"}\n[1, 2]\n')
    rows = read_jsonl(path)
    assert rows.line.tolist() == [1, 3]
    assert rows.parse_problems[0][:2] == (4, "malformed JSON")


def test_rows_without_dataset_name_take_the_file_dataset(tmp_path):
    write_image(tmp_path / "food101/a.png")
    write_image(tmp_path / "food101/b.png", colour=(0, 0, 255))
    write_jsonl(tmp_path / "food101/train.jsonl", [{"image": "a.png", "label": 3}])
    write_jsonl(tmp_path / "food101/test.jsonl", [{"image": "b.png", "label": 100, "label_name": "x"}])
    result = run_ingest({"model": {"num_labels": 101},
                         "data": {"train_jsonl": str(tmp_path / "food101/train.jsonl"),
                                  "val_jsonl": str(tmp_path / "food101/test.jsonl")}})
    assert result.train["dataset_name"].tolist() == ["food101"]
    assert result.val["label_name"].tolist() == ["x"]
    assert isinstance(result.rejected, pd.DataFrame) and result.rejected.empty


def replace_file(params, lines: list[bytes], file_index: int = 0, split: str = "train") -> Path:
    path = Path(params["data"][f"{split}_jsonl_list"][file_index])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def good_row(k: int) -> bytes:
    return json.dumps({"image": f"img/train/{k % 3}_{k // 3}.png", "label": k % 3, "dataset_name": "alpha"}).encode()


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize(("bad", "reason"), [
    (b'{"image": "img/train/0_0.png", "label": 0, "dataset_name": "alpha", "label_name": "caf\xe9"}', "not UTF-8"),
    (b'{"image": "img/train/\xff.png", "label": 0, "dataset_name": "alpha"}', "not UTF-8"),
    (b'{"image": "img/train/0_0.png", "label": 1180591620717411303424, "dataset_name": "alpha"}', "label out of range"),
    (b'{"image": "img/train/0_0.png", "label": "2", "dataset_name": "alpha"}', "non-integer label"),
])
def test_bad_bytes_and_labels_are_row_errors_under_both_policies(two_datasets, policy, bad, reason):
    params = with_overrides(two_datasets, data={"on_bad_rows": policy})
    path = replace_file(params, [good_row(1), good_row(2), bad])
    if policy == "error":
        with pytest.raises(RecordError, match=f"{path}:3: {reason}"):
            run_ingest(params)
        return
    result = run_ingest(params)
    assert result.rejected[["line", "reason"]].values.tolist() == [[3, reason]]
    assert sorted(result.train.loc[result.train["source_file"] == str(path), "line"]) == [1, 2]


@pytest.mark.parametrize("every_row", [True, False])
def test_string_labels_are_rejected_whether_one_row_or_every_row_has_them(two_datasets, every_row):
    # One rule for the fast (pyarrow) and the line-by-line parse: a label is a JSON integer.
    params = with_overrides(two_datasets, data={"on_bad_rows": "skip"})
    rows = [json.dumps({"image": f"img/train/{k}_0.png", "label": str(k), "dataset_name": "alpha"}).encode()
            for k in range(3)]
    if not every_row:
        rows[0] = good_row(0)
    path = replace_file(params, rows)
    result = run_ingest(with_overrides(params, data={"on_bad_rows": "skip"})) if not every_row else None
    if every_row:
        with pytest.raises(RecordError, match=rf"{path}: no valid rows left \(3 dropped: {{'non-integer label': 3}}\)"):
            run_ingest(params)
    else:
        assert result.rejected["line"].tolist() == [2, 3]
        assert "is a string: labels are JSON integers" in result.rejected["detail"].iloc[0]


def test_class_name_labels_are_row_errors_with_file_and_line(two_datasets):
    params = copy.deepcopy(two_datasets)
    path = replace_file(params,
                        [json.dumps({"image": "img/train/0_0.png", "label": "zero", "dataset_name": "alpha"}).encode()])
    with pytest.raises(RecordError, match=rf"{path}:1: non-integer label: label 'zero' is a string.*label_name"):
        run_ingest(params)


def test_a_byte_order_mark_does_not_cost_the_first_row(two_datasets):
    params = with_overrides(two_datasets, data={"on_bad_rows": "skip"})
    path = replace_file(params, [b"\xef\xbb\xbf" + good_row(0), good_row(1), b'{"image": broken'])
    result = run_ingest(params)
    assert sorted(result.train.loc[result.train["source_file"] == str(path), "line"]) == [1, 2]
    assert result.rejected[["line", "reason"]].values.tolist() == [[3, "malformed JSON"]]


def test_the_same_image_written_two_ways_is_one_image(two_datasets, tmp_path):
    params = with_overrides(two_datasets, data={"on_bad_rows": "skip"})
    absolute = str(tmp_path / "alpha/img/train/0_0.png")
    path = replace_file(params, [good_row(0), json.dumps({"image": "./img/../img/train/0_0.png", "label": 0,
                                                          "dataset_name": "alpha"}).encode(), good_row(1)])
    val = replace_file(params, [json.dumps({"image": absolute, "label": 0, "dataset_name": "alpha"}).encode()],
                       split="val")
    result = run_ingest(params)
    assert result.rejected[["file", "line", "reason"]].values.tolist() == [[str(path), 2, "duplicate row"]]
    assert absolute in set(result.train["image"])
    assert result.val.loc[result.val["source_file"] == str(val), "image"].tolist() == [absolute]
    from food_multids.data.tables import count_overlap

    assert count_overlap(result.train, result.val) == 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_images_over_the_pixel_cap_are_rejected_at_ingest(two_datasets, tmp_path, fmt):
    big = write_image(tmp_path / f"alpha/img/train/big.{fmt.lower()}", size=(300, 200), fmt=fmt)
    params = with_overrides(two_datasets, data={"on_bad_rows": "skip", "max_image_pixels": 50_000})
    corrupt(params, [{"image": str(big), "label": 0, "dataset_name": "alpha"}])
    result = run_ingest(params)
    assert result.rejected["reason"].tolist() == ["image too large"]
    assert "300x200 = 0.1 M pixels > data.max_image_pixels 0.1 M" in result.rejected["detail"].iloc[0]
    assert str(big) not in set(result.train["image"])
    assert check_image_file(str(big), 60_000) is None


def test_a_label_past_int64_is_printed_as_the_integer_written(two_datasets):
    corrupt(two_datasets, ['{"image": "img/train/0_0.png", "label": 1180591620717411303424, "dataset_name": "alpha"}'])
    with pytest.raises(RecordError) as info:
        run_ingest(two_datasets)
    assert "label 1180591620717411303424 is beyond any num_classes" in str(info.value)
    assert "e+21" not in str(info.value)


def test_the_pixel_cap_message_names_the_setting_the_caller_has(tmp_path):
    from food_multids.inference.inputs import records_from_files

    image = write_image(tmp_path / "big.png", size=(400, 300))
    spaces = {"digits": (0, 10)}
    for setting in ("--max-image-pixels", "predict.max_image_pixels"):
        with pytest.raises(RecordError, match=rf"400x300 = 0.1 M pixels > {setting} 0.1 M"):
            records_from_files([], [image], "digits", spaces, max_image_pixels=100_000, pixels_setting=setting)
    with pytest.raises(RecordError) as info:  # the predict pipeline's default
        records_from_files([], [image], "digits", spaces, max_image_pixels=100_000)
    assert "predict.max_image_pixels" in str(info.value) and "data.max_image_pixels" not in str(info.value)
