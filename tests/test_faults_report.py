"""harness.report on hostile output folders and damaged inputs: it never deletes or overwrites a
file it did not write, and a damaged run file is a clear error or a warning, never a pandas
traceback or a NaN in a table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from harness.report import MANIFEST, build_report, main
from report_fakes import make_run

SEP = ((0.20, 0.22, 0.18, 0.20), (0.21, 0.23, 0.19, 0.21))
CONC = (0.30, 0.32)


# ----------------------------------------------------------------------------------- case A
def test_user_files_in_the_output_folder_survive_a_rerun(tmp_path):
    out = tmp_path / "out"
    make_run(tmp_path / "runs", "a", sep=SEP, conc=CONC)
    build_report([tmp_path / "runs"], out=out, plots=True)
    # Files a user put there, named like report files: the report did not write them.
    user = {"table_mine.csv": "mine", "plots/bars_mine.png": "mine", "significance_old.md": "x",
            "notes.txt": "keep"}
    for name, text in user.items():
        (out / name).write_text(text)
    build_report([tmp_path / "runs"], out=out, plots=True)
    for name, text in user.items():
        assert (out / name).read_text() == text, name
    assert (out / "table_glyphs.csv").is_file()


def test_stale_report_files_are_removed(tmp_path):
    out = tmp_path / "out"
    make_run(tmp_path / "runs", "a", sep=SEP, conc=CONC)
    make_run(tmp_path / "other", "b", dataset="cub200", sep=SEP, conc=CONC)
    build_report([tmp_path / "runs", tmp_path / "other"], out=out, plots=True)
    written = json.loads((out / MANIFEST).read_text())["files"]
    assert "table_cub200.md" in written and "plots/bars_cub200.pdf" in written
    build_report([tmp_path / "runs"], out=out, plots=True)
    assert not (out / "table_cub200.md").exists()
    assert not (out / "plots" / "bars_cub200.pdf").exists()
    assert (out / "plots" / "bars_glyphs.pdf").exists()


def test_a_users_readme_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my own notes")
    make_run(tmp_path / "runs", "a", sep=SEP, conc=CONC)
    assert main([str(tmp_path / "runs"), "--out", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "README.md" in err and "Traceback" not in err
    assert (out / "README.md").read_text() == "my own notes"
    assert not (out / "table_glyphs.csv").exists()


@pytest.mark.parametrize("entry", ["../victim.txt", "/abs/victim.txt", "sub/../../victim.txt"])
def test_manifest_entries_outside_the_folder_are_ignored(tmp_path, entry):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    if entry.startswith("/abs"):
        entry = str(victim)
    (out / MANIFEST).write_text(json.dumps({"files": [entry]}))
    make_run(tmp_path / "runs", "a", sep=SEP, conc=CONC)
    report = build_report([tmp_path / "runs"], out=out, plots=False)
    assert victim.read_text() == "keep"
    assert any("not relative paths inside" in n for n in report.notes)


def test_report_folder_of_the_earlier_version_is_taken_over(tmp_path):
    """No manifest yet: the files listed by the index an earlier version wrote are its own."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# Benchmark report\n\n| [README.md](README.md) | this index |"
                                   "\n| [table_old.csv](table_old.csv) | x |\n")
    (out / "table_old.csv").write_text("old")
    (out / "table_user.csv").write_text("user")
    make_run(tmp_path / "runs", "a", sep=SEP, conc=CONC)
    build_report([tmp_path / "runs"], out=out, plots=False)
    assert not (out / "table_old.csv").exists() and (out / "table_user.csv").exists()


# ----------------------------------------------------------------------------------- case B
def _csv(run: Path) -> Path:
    return run / "final" / "test_metrics.csv"


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_bytes(b"\x00\x9f\x92\x96\xff" * 50), "not a text file"),
    (lambda p: p.write_text(p.read_text().replace(",0.4,", ",garbage,", 1)), "line 2"),
    (lambda p: p.write_text("a,b\n1,2\n"), "lacks the columns"),
    (lambda p: p.write_text(""), "not a readable CSV"),
    (lambda p: p.write_text(p.read_text().replace(",0.48,", ",inf,", 1)), "finite number"),
])
def test_damaged_test_metrics_is_a_clear_error_naming_the_file(tmp_path, capsys, damage,
                                                                expected):
    run = make_run(tmp_path, "r", sep=SEP, conc=CONC)
    damage(_csv(run))
    assert main([str(run), "--out", str(tmp_path / "out"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(_csv(run)) in err and expected in err
    assert "Traceback" not in err


def test_damaged_run_in_a_scan_is_skipped_with_a_warning(tmp_path, capsys):
    make_run(tmp_path / "results", "good", sep=SEP, conc=CONC)
    bad = make_run(tmp_path / "results", "bad", sep=SEP, conc=CONC)
    _csv(bad).write_bytes(b"\xff\xfe\x00garbage")
    assert main([str(tmp_path / "results"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and str(_csv(bad)) in err
    table = pd.read_csv(tmp_path / "out" / "table_glyphs.csv")
    assert list(table[table["group"] == "harness"]["method"]) == ["good"]


def test_torn_last_row_is_left_out_with_a_warning_not_nan(tmp_path):
    run = make_run(tmp_path, "r", sep=SEP, conc=CONC)
    text = _csv(run).read_text().rstrip("\n").split("\n")
    header = text[0].split(",")
    torn = text[-1].split(",")[:header.index("map_at_r")]  # killed while appending the row
    _csv(run).write_text("\n".join(text[:-1] + [",".join(torn)]) + "\n")
    report = build_report([run], out=tmp_path / "out", plots=False)
    t = report.tables["glyphs"].set_index("method")
    assert t.loc["r", "reproductions"] == 1  # the second reproduction lost its row
    assert t.loc["r", "concatenated_map_at_r_mean"] == pytest.approx(CONC[0])
    assert not t.loc["r", [c for c in t.columns if c.endswith("_mean")]].isna().any()
    assert any(f"line {len(text)}" in n and "left out" in n for n in report.notes)


@pytest.mark.parametrize("name, content, expected", [
    ("config.json", "[1, 2]", "expected a JSON object"),
    ("config.json", b"\xff\xfe\x00", "not a text file"),
    ("config.json", '{"data": "cub"}', "[data] is not an object"),
])
def test_damaged_config_is_a_clear_error(tmp_path, capsys, name, content, expected):
    run = make_run(tmp_path, "r", sep=SEP, conc=CONC)
    path = run / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    assert main([str(run), "--out", str(tmp_path / "out"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err and "Traceback" not in err


def test_damaged_side_files_become_warnings(tmp_path):
    run = make_run(tmp_path, "r", sep=SEP, conc=CONC)
    (run / "final" / "untrained_metrics.json").write_text('{"map_at_r": "zero"}')
    (run / "search_summary.json").write_text('{"trials": [1, 2]}')
    report = build_report([run], out=tmp_path / "out", plots=False)
    assert not (report.tables["glyphs"]["group"] == "untrained").any()
    assert any("untrained_metrics.json" in n and "not a finite number" in n
               for n in report.notes)
    assert any("search_summary.json" in n for n in report.notes)


# ----------------------------------------------------------------------------------- case I
def test_unreadable_input_is_named_a_permission_problem(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path, "r", sep=SEP, conc=CONC)
    real_open = open

    def guarded_open(file, *args, **kwargs):  # tests run as root: chmod 000 would not bite
        if str(file) == str(_csv(run)):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    assert main([str(run), "--out", str(tmp_path / "out"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "permission" in err.lower() and str(_csv(run)) in err
    assert "corrupt" not in err and "damaged" not in err
