"""benchmarks/past_the_cap.py: the final folds the cap ended are trained on from the same start
(their recorded validations must come back first), and each run's concatenated test MAP@R is
recomputed with them; the recorded score is checked from the recorded embeddings first."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from harness.run import main
from conftest import benchmark_script, write_study


def script():
    return benchmark_script("past_the_cap")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, glyph_root):
    tmp = tmp_path_factory.mktemp("cap")
    study = write_study(tmp, glyph_root, iters=4)  # 2 epochs, patience 5: the cap ends every fold
    out = tmp / "seed_0" / "tiny_glyphs"
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu"]) == 0
    return out


def test_capped_folds_train_on_and_every_run_is_rescored(finished, tmp_path):
    out = tmp_path / "cap.csv"
    # The fixture's study trained in this process, with its thread count.
    assert script().main([str(finished), "--max-epochs", "4", "--jobs", "1", "--out", str(out),
                          "--work", str(tmp_path / "work"),
                          "--threads", str(torch.get_num_threads())]) == 0
    rows = pd.read_csv(out)
    assert list(rows["reproduction"]) == [0, 1]
    assert list(rows["capped_folds"]) == [4, 4]
    for _, row in rows.iterrows():
        recorded = json.loads((finished / "final" / f"rep_{row['reproduction']:02d}" /
                               "concatenated.json").read_text())["map_at_r"]
        assert row["test_map_at_r"] == pytest.approx(recorded, abs=1e-6)
        if row["epochs_added"] == 0:  # no fold improved or trained on: the same models
            assert row["test_map_at_r_past_cap"] == row["test_map_at_r"]
    # The extended folds trained in --work, up to the new cap at most.
    histories = list((tmp_path / "work").rglob("history.json"))
    assert len(histories) == 8
    assert all(max(h["epoch"] for h in json.loads(p.read_text())) <= 4 for p in histories)
    assert "past_cap" in out.with_suffix(".md").read_text()


def test_a_fold_that_does_not_retrace_its_curve_stops_the_script(finished, tmp_path):
    copy = tmp_path / "seed_0" / "tiny_glyphs"
    shutil.copytree(finished, copy)
    history = copy / "final" / "rep_01" / "fold_2" / "history.json"
    rows = json.loads(history.read_text())
    rows[0]["map_at_r"] += 0.01
    history.write_text(json.dumps(rows))
    with pytest.raises(SystemExit, match="did not reproduce its recorded validations"):
        script().extend_run(str(copy), 1, 4, str(tmp_path / "work"), torch.get_num_threads())


def test_embeddings_that_do_not_give_the_recorded_score_are_refused(finished, tmp_path):
    copy = tmp_path / "seed_0" / "tiny_glyphs"
    shutil.copytree(finished, copy)
    concatenated = copy / "final" / "rep_01" / "concatenated.json"
    record = json.loads(concatenated.read_text())
    record["map_at_r"] += 0.05
    concatenated.write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="not the run's models"):
        script().extend_run(str(copy), 1, 4, str(tmp_path / "work"), torch.get_num_threads())
    with pytest.raises(SystemExit, match="not above the study's cap"):
        script().extend_run(str(finished), 1, 2, str(tmp_path / "work"))
