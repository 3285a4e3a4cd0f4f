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
    assert list(rows["epochs_added"]) == [8, 8]  # patience 5: each fold trains on to epoch 4
    for _, row in rows.iterrows():
        recorded = json.loads((finished / "final" / f"rep_{row['reproduction']:02d}" /
                               "concatenated.json").read_text())["map_at_r"]
        assert row["test_map_at_r"] == pytest.approx(recorded, abs=1e-6)
    # The past-cap score is that of the extended folds' best models, concatenated.
    assert rows["test_map_at_r_past_cap"][1] == pytest.approx(
        rescored(finished, tmp_path / "work" / "seed_0" / "tiny_glyphs" / "rep_01"), abs=1e-6)
    folds = pd.read_csv(tmp_path / "cap_folds.csv")
    assert len(folds) == 8 and set(folds["stopped_at"]) == {4} and set(folds["cap"]) == {2}
    assert "early stopping ended 0 before the new cap" in out.with_suffix(".md").read_text()


def rescored(study, rep_work) -> float:
    """Concatenated test MAP@R of the 4 best.pt files in REP_WORK, computed here."""
    from harness.data import prepare_data
    from harness.final import concatenate, embed_test_set, test_metrics
    from harness.search import config_for_params
    from harness.train import load_best_model

    cfg, _ = benchmark_script("retrain_trial").recorded_config(study, [])
    best = json.loads((study / "final" / "best_trial.json").read_text())
    cfg = config_for_params(cfg, best["params"])
    data, cpu = prepare_data(cfg), torch.device("cpu")
    embeddings = [embed_test_set(cfg, load_best_model(cfg, rep_work / f"fold_{k}" / "best.pt",
                                                      cpu), data, cpu) for k in range(4)]
    return test_metrics(concatenate(embeddings), cpu)["map_at_r"]


def test_damaged_embeddings_or_an_interrupted_work_folder_are_refused(finished, tmp_path):
    copy = tmp_path / "seed_0" / "tiny_glyphs"
    shutil.copytree(finished, copy)
    npz = copy / "final" / "rep_01" / "fold_3" / "test_embeddings.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(SystemExit, match="cannot read the fold's test embeddings"):
        script().extend_run(str(copy), 1, 4, str(tmp_path / "work"), torch.get_num_threads())
    shutil.copy(finished / "final" / "rep_01" / "fold_3" / "test_embeddings.npz", npz)
    unfinished = tmp_path / "work" / "seed_0" / "tiny_glyphs" / "rep_01" / "fold_0"
    unfinished.mkdir(parents=True)
    (unfinished / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="interrupted earlier training"):
        script().extend_run(str(copy), 1, 4, str(tmp_path / "work"), torch.get_num_threads())


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
    with pytest.raises(SystemExit, match="not the models or the test set"):
        script().extend_run(str(copy), 1, 4, str(tmp_path / "work"), torch.get_num_threads())
    with pytest.raises(SystemExit, match="not above the study's cap"):
        script().extend_run(str(finished), 1, 2, str(tmp_path / "work"))
