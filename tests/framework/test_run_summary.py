"""The end of a run: where its results are, and a link to the newest report that survives the next run."""

from __future__ import annotations

from food_multids.framework.run_summary import link_latest, newest_version, summary_lines


def test_the_latest_link_follows_the_newest_version_and_the_summary_names_each_result(tmp_path):
    for version in ("2026-12-06T01.00.00.000Z", "2026-12-06T02.00.00.000Z"):
        report = tmp_path / f"data/08_reporting/report.html/{version}/report.html"
        report.parent.mkdir(parents=True)
        report.write_text(version)
        newest = newest_version(tmp_path / "data/08_reporting/report.html")
        link_latest(newest, tmp_path / "data/08_reporting/latest/report.html")
        assert (tmp_path / "data/08_reporting/latest/report.html").read_text() == version  # replaced, not stale
    lines = summary_lines(tmp_path, {"report_html": newest}, {"name": "train · local · m · x", "status": "FINISHED",
                                                             "experiment_id": "3", "run_id": "abc"},
                          {"logged": True, "registry_uri": "models:/food_multids/7"})
    assert lines[0] == "Results of this run:"
    assert any(line.endswith("data/08_reporting/report.html/2026-12-06T02.00.00.000Z/report.html") for line in lines)
    assert any("http://127.0.0.1:5000/#/experiments/3/runs/abc" in line for line in lines)
    assert any("make serve MODEL=models:/food_multids/7" in line for line in lines)
    assert summary_lines(tmp_path, {}, None, None) == []  # a run that wrote nothing to show says nothing
