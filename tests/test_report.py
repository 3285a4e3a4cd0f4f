"""harness.report on hand-made run folders: numbers, best marks, paper rows, tests, plots."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.aggregate import summarize
from harness.paper_numbers import PAPER_LABEL, PAPER_RESULTS, REAL_DATASETS, paper_results
from harness.report import NEEDS_TWO, ReportError, build_report, find_run_dirs, holm, main
from report_fakes import FACTORS, make_run

# Method A: 3 reproductions. Separated per-reproduction means 0.23, 0.33, 0.25.
A_SEP = ((0.20, 0.22, 0.24, 0.26), (0.30, 0.32, 0.34, 0.36), (0.25, 0.25, 0.25, 0.25))
A_CONC = (0.30, 0.40, 0.35)
# Method B: lower MAP@R, but a higher P@1 (given explicitly) in the separated mode.
B_SEP = ((0.10, 0.10, 0.10, 0.10), (0.12, 0.12, 0.12, 0.12), (0.14, 0.14, 0.14, 0.14))
B_CONC = (0.15, 0.16, 0.20)
B_P1 = {"separated": [[0.9] * 4, [0.8] * 4, [0.7] * 4], "concatenated": [0.1, 0.1, 0.1]}


def table(report, dataset="glyphs") -> pd.DataFrame:
    return pd.read_csv(report.out / f"table_{dataset}.csv")


def row(frame: pd.DataFrame, method: str) -> pd.Series:
    return frame.set_index("method").loc[method]


@pytest.fixture()
def two_methods(tmp_path):
    results = tmp_path / "results"
    make_run(results, "method_a", sep=A_SEP, conc=A_CONC, untrained=0.5)
    make_run(results, "method_b", loss="proxy_nca_pp", sep=B_SEP, conc=B_CONC, p_at_1=B_P1)
    report = build_report(None, out=tmp_path / "out", runs_dir=results, plots=False,
                          command="pytest")
    return report


def test_mean_and_std_over_reproductions(two_methods):
    a = row(table(two_methods), "method_a")
    per_rep_sep = np.array(A_SEP).mean(axis=1)
    assert np.allclose(per_rep_sep, [0.23, 0.33, 0.25])
    assert a["separated_map_at_r_mean"] == pytest.approx(0.27)
    assert a["separated_map_at_r_std"] == pytest.approx(np.sqrt(0.0028))  # ddof=1, by hand
    assert a["concatenated_map_at_r_mean"] == pytest.approx(0.35)
    assert a["concatenated_map_at_r_std"] == pytest.approx(0.05)
    for metric in ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "r_precision"):
        assert a[f"concatenated_{metric}_mean"] == pytest.approx(0.35 * FACTORS[metric])
        assert a[f"separated_{metric}_std"] == pytest.approx(np.sqrt(0.0028) * FACTORS[metric])
    assert a["reproductions"] == 3 and a["trials"] == 3
    assert a["max_iterations_per_fold"] == 40
    md = (two_methods.out / "table_glyphs.md").read_text()
    assert "27.00 ± 5.29" in md and "35.00 ± 5.00" in md


def test_best_value_marked_per_column(two_methods):
    t = table(two_methods)
    a, b = row(t, "method_a"), row(t, "method_b")
    assert a["concatenated_map_at_r_best"] and not b["concatenated_map_at_r_best"]
    assert b["separated_precision_at_1_best"] and not a["separated_precision_at_1_best"]
    md = (two_methods.out / "table_glyphs.md").read_text()
    assert "**35.00 ± 5.00**" in md and "**80.00 ± 10.00**" in md
    assert "**17.00" not in md  # method B's concatenated MAP@R is not the best
    tex = (two_methods.out / "table_glyphs.tex").read_text()
    assert r"\textbf{35.00 $\pm$ 5.00}" in tex and r"\begin{tabular}" in tex
    assert "method\\_a" in tex


def _markdown_cells(md: str) -> list[list[tuple[str, bool]]]:
    rows = [line for line in md.splitlines() if line.startswith("| ") and "***" not in line]
    return [[(c.strip("*").replace("\\_", "_"), c.startswith("**"))
             for c in line.strip("| ").split(" | ")] for line in rows[1:]]  # no header


def _latex_cells(tex: str) -> list[list[tuple[str, bool]]]:
    body = tex.split("\\midrule\n", 1)[1].split("\\bottomrule")[0]
    rows = [line for line in body.splitlines() if " & " in line]
    out = []
    for line in rows:
        cells = []
        for c in line.removesuffix(" \\\\").split(" & "):
            bold = c.startswith("\\textbf{")
            c = c.removeprefix("\\textbf{").removesuffix("}") if bold else c
            c = c.replace("$\\pm$", "±").replace("\\_", "_")
            cells.append(("–" if c == "--" else c.strip(), bold))
        out.append(cells)
    return out


def test_latex_table_equals_markdown_table(tmp_path):
    # pandas writes the LaTeX, the harness the markdown: same cells, same best marks.
    make_run(tmp_path, "proxy_anchor_cub", dataset="cub200", sep=A_SEP, conc=A_CONC)
    make_run(tmp_path, "other_cub", dataset="cub200", loss="proxy_nca_pp", sep=B_SEP,
             conc=B_CONC, p_at_1=B_P1, untrained=0.5)
    report = build_report([tmp_path], out=tmp_path / "out", plots=False)
    md = _markdown_cells((report.out / "table_cub200.md").read_text())
    tex_text = (report.out / "table_cub200.tex").read_text()
    tex = _latex_cells(tex_text)
    assert len(md) == len(tex) >= 5  # 2 methods, 2 untrained rows, the paper rows
    assert tex == md
    assert sum(bold for row in tex for _, bold in row) == 6  # one best per value column (no tie)
    lines = tex_text.splitlines()
    paper = next(i for i, line in enumerate(lines) if "multicolumn" in line)
    assert lines[paper - 1] == lines[paper + 1] == r"\midrule"
    assert lines[paper + 2].startswith("Proxy")
    assert lines[[i for i, line in enumerate(lines) if line.startswith("untrained")][0] - 1] \
        == r"\midrule"


def test_single_method_has_no_best_mark(tmp_path):
    make_run(tmp_path, "alone", sep=A_SEP, conc=A_CONC)
    report = build_report([tmp_path / "alone"], out=tmp_path / "out", plots=False)
    assert not table(report).filter(regex="_best$").to_numpy().any()
    assert "**" not in (report.out / "table_glyphs.md").read_text().split("|---", 1)[1]


def test_untrained_row_is_reference_not_best(two_methods):
    t = table(two_methods)
    u = t[t["group"] == "untrained"]
    assert len(u) == 2  # the two fakes have different untrained numbers
    first = u[u["study"] == "method_a"].iloc[0]
    # 0.5 beats every method's MAP@R but an untrained row is never marked best
    assert first["concatenated_map_at_r_mean"] == pytest.approx(0.5)
    assert first["separated_precision_at_1_mean"] == pytest.approx(1.0)
    assert not u.filter(regex="_best$").to_numpy().any()
    md = (two_methods.out / "table_glyphs.md").read_text()
    assert "| untrained (method_a) |".replace("_", "\\_") in md


def test_shared_untrained_result_gives_one_row(tmp_path):
    make_run(tmp_path, "a", sep=A_SEP, conc=A_CONC, untrained=0.07)
    make_run(tmp_path, "b", sep=B_SEP, conc=B_CONC, untrained=0.07)
    report = build_report([tmp_path / "a", tmp_path / "b"], out=tmp_path / "out", plots=False)
    t = table(report)
    assert list(t.loc[t["group"] == "untrained", "method"]) == ["untrained"]


def test_no_paper_rows_for_glyphs(two_methods):
    assert paper_results("glyphs") == []
    assert (table(two_methods)["group"] != PAPER_LABEL).all()
    for suffix in ("md", "csv", "tex"):
        text = (two_methods.out / f"table_glyphs.{suffix}").read_text()
        assert "own protocol" not in text and "Proxy-ISA" not in text


def test_paper_rows_for_cub_labelled_below_separator(tmp_path):
    make_run(tmp_path, "proxy_anchor_cub", dataset="cub200", loss="proxy_anchor", sep=A_SEP,
             conc=A_CONC)
    report = build_report([tmp_path / "proxy_anchor_cub"], out=tmp_path / "out", plots=False)
    t = table(report, "cub200")
    papers = t[t["group"] == PAPER_LABEL]
    expected = paper_results("cub200", {"proxy_anchor"})
    assert len(papers) == len(expected) == 1
    p = papers.iloc[0]
    assert p["concatenated_precision_at_1_mean"] == pytest.approx(0.663)
    assert p["concatenated_map_at_r_mean"] == pytest.approx(0.257)
    assert "Proxy-ISA" in p["source"] and p["protocol"]
    assert not papers.filter(regex="_best$").to_numpy().any()
    assert list(t["group"]) == ["harness", "untrained", PAPER_LABEL]  # paper rows last
    md = (report.out / "table_cub200.md").read_text().splitlines()
    sep_line = next(i for i, line in enumerate(md) if PAPER_LABEL in line and line.startswith("|"))
    method_line = next(i for i, line in enumerate(md) if line.startswith("| proxy\\_anchor\\_cub"))
    paper_line = next(i for i, line in enumerate(md) if line.startswith("| Proxy-Anchor (in"))
    assert method_line < sep_line < paper_line
    assert "66.30 ± 0.30" in md[paper_line]
    tex = (report.out / "table_cub200.tex").read_text()
    assert r"\textit{paper (own protocol, not comparable)}" in tex


def test_paper_rows_only_for_methods_present_and_real_datasets():
    assert {r.dataset for r in PAPER_RESULTS} <= set(REAL_DATASETS)
    assert all(r.source and r.protocol for r in PAPER_RESULTS)
    assert paper_results("cub200", {"triplet"}) == []
    assert [r.method for r in paper_results("cars196", {"proxy_synthesis_normalized_softmax"})] \
        == ["PS + Norm-Softmax"]


def test_runs_of_one_data_set_on_different_data_get_their_own_tables(tmp_path):
    """A CUB run on a subset and one on the whole data set are not one table: the split
    manifests' fingerprints tell them apart; a run without one joins agreeing runs."""
    full, subset = "a" * 64, "b" * 64
    make_run(tmp_path, "pa_full", dataset="cub200", sep=A_SEP, conc=A_CONC,
             data_fingerprint=full)
    make_run(tmp_path, "nca_full", dataset="cub200", loss="proxy_nca_pp", sep=B_SEP,
             conc=B_CONC, data_fingerprint=full)
    make_run(tmp_path, "pa_subset", dataset="cub200", sep=B_SEP, conc=B_CONC,
             data_fingerprint=subset)
    make_run(tmp_path, "pa_older", dataset="cub200", sep=A_SEP, conc=A_CONC)
    report = build_report(None, out=tmp_path / "out", runs_dir=tmp_path, plots=False)
    assert set(report.tables) == {"cub200 [data aaaaaaaa]", "cub200 [data bbbbbbbb]",
                                  "cub200 [data unrecorded]"}
    assert sorted(report.tables["cub200 [data aaaaaaaa]"].query("group == 'harness'")["method"]) \
        == ["nca_full", "pa_full"]
    assert (report.tables["cub200 [data bbbbbbbb]"]["group"] == PAPER_LABEL).any()
    assert set(report.significance["dataset"]) == {"cub200 [data aaaaaaaa]"}  # the one pair
    assert any("ran on 2 different data sets" in n for n in report.notes)
    assert (report.out / "table_cub200_data_aaaaaaaa.md").exists()

    make_run(tmp_path, "pa_subset", dataset="cub200", sep=B_SEP, conc=B_CONC,
             data_fingerprint=full)  # now all recorded ones agree: one table
    report = build_report(None, out=tmp_path / "out2", runs_dir=tmp_path, plots=False)
    assert set(report.tables) == {"cub200"}
    assert any(n.startswith("pa_older (") and "no data fingerprint recorded" in n
               for n in report.notes)


def test_welch_p_value_matches_scipy(two_methods):
    sig = pd.read_csv(two_methods.out / "significance.csv")
    conc = sig[(sig["mode"] == "concatenated") & (sig["metric"] == "map_at_r")].iloc[0]
    expected = stats.ttest_ind(A_CONC, B_CONC, equal_var=False)
    assert conc["p"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert conc["t"] == pytest.approx(expected.statistic, rel=1e-12)
    sep = sig[(sig["mode"] == "separated") & (sig["metric"] == "map_at_r")].iloc[0]
    expected = stats.ttest_ind(np.mean(A_SEP, axis=1), np.mean(B_SEP, axis=1), equal_var=False)
    assert sep["p"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert conc["p_holm"] == pytest.approx(conc["p"])  # a family of one pair
    md = (two_methods.out / "significance.md").read_text()
    assert "Welch" in md and "Holm" in md and "equal_var=False" in md
    assert "search's own variance" in md  # says what the tests do not cover


def test_holm_by_hand():
    # sorted: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> max(.06, .04) = .06
    assert np.allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = holm([np.nan, 0.02, 0.04])  # NaN is not part of the family (m = 2)
    assert np.isnan(out[0]) and np.allclose(out[1:], [0.04, 0.04])
    assert np.allclose(holm([0.6, 0.7]), [1.0, 1.0])


def test_holm_applied_across_pairs(tmp_path):
    make_run(tmp_path, "a", sep=A_SEP, conc=A_CONC)
    make_run(tmp_path, "b", sep=B_SEP, conc=B_CONC)
    make_run(tmp_path, "c", sep=B_SEP, conc=(0.25, 0.31, 0.22))
    report = build_report([tmp_path], out=tmp_path / "out", plots=False)
    sig = report.significance
    fam = sig[(sig["mode"] == "concatenated")]
    assert len(fam) == 3 and (fam["family_size"] == 3).all()
    assert np.allclose(fam["p_holm"], holm(fam["p"].to_numpy()))
    assert (fam["p_holm"] >= fam["p"]).all()


def test_single_reproduction_says_na(tmp_path):
    make_run(tmp_path, "one", sep=A_SEP[:1], conc=A_CONC[:1])
    make_run(tmp_path, "two", sep=B_SEP, conc=B_CONC)
    report = build_report([tmp_path], out=tmp_path / "out", plots=False)
    sig = pd.read_csv(report.out / "significance.csv")
    assert (sig["note"] == NEEDS_TWO).all() and sig["p"].isna().all()
    assert NEEDS_TWO in (report.out / "significance.md").read_text()
    one = row(table(report), "one")
    assert one["reproductions"] == 1 and np.isnan(one["concatenated_map_at_r_std"])
    assert "| **30.00** |" in (report.out / "table_glyphs.md").read_text()


def test_incomplete_and_duplicated_reproductions(tmp_path):
    extra = [{"reproduction": 1, "mode": "separated", "fold": 0, "map_at_r": 0.9}]
    make_run(tmp_path, "r", sep=A_SEP[:1], conc=A_CONC[:1], extra_rows=extra)
    report = build_report([tmp_path / "r"], out=tmp_path / "out", plots=False)
    assert row(table(report), "r")["reproductions"] == 1
    assert any("incomplete" in n for n in report.notes)


def test_duplicated_row_is_an_error_not_averaged(tmp_path):
    # Two results of one fold model: the final step refuses to average them, so does the report.
    extra = [{"reproduction": 0, "mode": "separated", "fold": 0,
              **{m: 0.9 * f for m, f in FACTORS.items()}}]
    make_run(tmp_path / "runs", "dup", sep=A_SEP, conc=A_CONC, extra_rows=extra)
    make_run(tmp_path / "runs", "ok", sep=A_SEP, conc=A_CONC)
    with pytest.raises(ReportError, match=r"dup/final/test_metrics.csv: .*same \(reproduction"):
        build_report([tmp_path / "runs" / "dup"], out=tmp_path / "out", plots=False)
    report = build_report([tmp_path / "runs"], out=tmp_path / "out", plots=False)
    assert [r.label for r in report.runs] == ["ok"]
    assert any("skipped" in n and "same (reproduction" in n for n in report.notes)


def test_table_agrees_with_the_final_steps_summary(two_methods):
    # One aggregation (harness.aggregate) for final/summary.csv and the report's tables.
    for run in two_methods.runs:
        frame = pd.read_csv(run.path / "final" / "test_metrics.csv")
        summary = summarize(frame).set_index(["mode", "metric"])
        r = row(table(two_methods), run.label)
        for (mode, metric), s in summary.iterrows():
            assert r[f"{mode}_{metric}_mean"] == pytest.approx(s["mean"], rel=1e-12)
            assert r[f"{mode}_{metric}_std"] == pytest.approx(s["std"], rel=1e-12)


def test_plots_and_index(tmp_path):
    make_run(tmp_path, "a", sep=A_SEP, conc=A_CONC, history=True, study_trials=4)
    make_run(tmp_path, "b", sep=B_SEP, conc=B_CONC, history=True, study_trials=1)
    make_run(tmp_path, "c", sep=B_SEP, conc=B_CONC)  # no study.db, no history
    out = tmp_path / "out"
    report = build_report([tmp_path], out=out, command="python -m harness.report test")
    for stem in ("bars_glyphs", "curves_glyphs_a", "curves_glyphs_b", "optuna_history_glyphs_a",
                 "optuna_importances_glyphs_a", "optuna_history_glyphs_b"):
        for suffix in (".png", ".pdf"):
            path = out / "plots" / (stem + suffix)
            assert path.is_file() and path.stat().st_size > 1000, path
    assert not (out / "plots" / "optuna_importances_glyphs_b.png").exists()
    notes = "\n".join(report.notes)
    assert "b: parameter importances need ≥2 complete trials" in notes
    assert "c: Optuna plots skipped: no study.db" in notes
    assert "c: training curves skipped" in notes
    index = (out / "README.md").read_text()
    for path, _ in report.files:
        assert path.is_file()
        assert f"]({path.relative_to(out)})" in index
    assert "python -m harness.report test" in index
    assert "0123456789ab+dirty" in index and str(tmp_path / "a") in index
    assert "significance.md" in index


def test_errors(tmp_path, capsys):
    with pytest.raises(ReportError, match="no run folders found"):
        find_run_dirs(None, runs_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no run folders found"):
        build_report(None, out=tmp_path / "out", runs_dir=tmp_path / "empty")
    unfinished = tmp_path / "results" / "unfinished"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text(json.dumps({"name": "unfinished"}))
    with pytest.raises(ReportError, match="lacks final/test_metrics.csv"):
        find_run_dirs([unfinished])
    with pytest.raises(ReportError, match="no such folder"):
        find_run_dirs([tmp_path / "nope"])
    # In a recursive scan the unfinished run is skipped with a warning.
    make_run(tmp_path / "results", "done", sep=A_SEP, conc=A_CONC)
    found, notes = find_run_dirs(None, runs_dir=tmp_path / "results")
    assert [p.name for p in found] == ["done"]
    assert len(notes) == 1 and "unfinished" in notes[0]
    # The CLI prints the error and returns 2, without a traceback.
    assert main([str(unfinished), "--out", str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main([str(tmp_path / "results"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    assert "unfinished" in capsys.readouterr().err


def test_previous_output_replaced(tmp_path):
    out = tmp_path / "out"
    make_run(tmp_path / "runs", "a", sep=A_SEP, conc=A_CONC)
    make_run(tmp_path / "old", "b", dataset="cub200", sep=A_SEP, conc=A_CONC)
    build_report([tmp_path / "runs", tmp_path / "old"], out=out, plots=True)
    assert (out / "table_cub200.csv").exists() and (out / "plots" / "bars_cub200.png").exists()
    (out / "notes_of_the_user.txt").write_text("keep")
    build_report([tmp_path / "runs"], out=out, plots=False)
    # Stale files of the earlier report are removed; files of other origin are kept.
    assert not (out / "plots" / "bars_cub200.png").exists()
    assert not (out / "table_cub200.csv").exists()
    assert (out / "notes_of_the_user.txt").exists() and (out / "table_glyphs.csv").exists()


def test_report_folder_is_not_scanned(tmp_path):
    results = tmp_path / "results"
    make_run(results, "a", sep=A_SEP, conc=A_CONC)
    build_report(None, out=results / "report", runs_dir=results, plots=False)
    make_run(results / "report", "stray", sep=A_SEP, conc=A_CONC)  # inside the output folder
    found, _ = find_run_dirs(None, runs_dir=results, exclude=results / "report")
    assert [p.name for p in found] == ["a"]




@pytest.mark.slow
def test_report_on_a_real_tiny_run(tmp_path, monkeypatch):
    from harness.run import main as run_main
    from conftest import write_study

    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    study = write_study(tmp_path, tmp_path / "glyphs")  # test_run's tiny study, 2 reproductions
    run = tmp_path / "results" / "tiny"
    assert run_main(["--study", str(study), "--output", str(run), "--device", "cpu",
                     "--reproductions", "2"]) == 0
    report = build_report(None, out=tmp_path / "report", runs_dir=tmp_path / "results")
    t = table(report)
    frame = pd.read_csv(run / "final" / "test_metrics.csv")
    conc = frame[frame["mode"] == "concatenated"]["map_at_r"].to_numpy()
    tiny = row(t, "tiny")
    assert tiny["concatenated_map_at_r_mean"] == pytest.approx(conc.mean())
    assert tiny["concatenated_map_at_r_std"] == pytest.approx(conc.std(ddof=1))
    summary = pd.read_csv(run / "final" / "summary.csv").set_index(["mode", "metric"])
    assert tiny["separated_map_at_r_mean"] == pytest.approx(
        summary.loc[("separated", "map_at_r"), "mean"])
    assert tiny["separated_map_at_r_std"] == pytest.approx(
        summary.loc[("separated", "map_at_r"), "std"])
    for stem in ("bars_glyphs", "curves_glyphs_tiny", "optuna_history_glyphs_tiny"):
        assert (report.out / "plots" / f"{stem}.png").is_file()
