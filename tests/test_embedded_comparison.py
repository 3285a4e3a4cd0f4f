"""benchmarks/embedded_comparison.py: its summary of run folders and the seed agreement."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import REPO, benchmark_script


def driver():
    return benchmark_script("embedded_comparison")


def write_comparison(folder, seed: int, scores: dict[str, float]) -> None:
    folder.mkdir()
    table = [{"study": s, "concatenated_map_at_r": v} for s, v in scores.items()]
    (folder / "comparison.json").write_text(json.dumps({"seed": seed, "table": table}))


@pytest.mark.parametrize("second, rho", [
    ({"a": 0.5, "b": 0.4, "c": 0.3, "d": 0.2}, 1.0),  # same order, other values
    ({"a": 0.2, "b": 0.3, "c": 0.4, "d": 0.5}, -1.0),  # reversed
    ({"a": 0.5, "b": 0.3, "c": 0.4, "d": 0.2}, 0.8),  # one adjacent swap: 1 - 6*2/(4*15)
])
def test_spearman_of_two_seeds(tmp_path, second, rho):
    write_comparison(tmp_path / "s0", 0, {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6})
    write_comparison(tmp_path / "s1", 1, second)
    out = tmp_path / "seeds.md"
    assert driver().main(["spearman", str(tmp_path / "s0"), str(tmp_path / "s1"),
                          "--out", str(out)]) == 0
    text = out.read_text()
    assert f"**{rho:.3f}**" in text and "4 methods in both" in text
    same = {1.0: 6, -1.0: 0, 0.8: 5}[rho]  # of the 6 pairs
    assert f"same order in both seeds: {same} of 6" in text


def test_spearman_writes_beside_the_first_run_by_default(tmp_path):
    """Without --out, seeds.md lands next to the seed folders (results/embedded/seeds.md for
    the committed comparison), not in a fixed place of the repository."""
    write_comparison(tmp_path / "s0", 0, {"a": 0.9, "b": 0.8, "c": 0.7})
    write_comparison(tmp_path / "s1", 1, {"a": 0.9, "b": 0.7, "c": 0.8})
    assert driver().main(["spearman", str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    assert "**0.500**" in (tmp_path / "seeds.md").read_text()


def test_seed_agreement_counts_pairs_and_gaps():
    a = pd.Series({"x": 0.5, "y": 0.4, "z": 0.3})
    b = pd.Series({"x": 0.3, "y": 0.45, "z": 0.2})  # x-y swapped; x-z and y-z kept
    agree = driver().seed_agreement(a, b)
    assert (agree["pairs"], agree["same_order"]) == (3, 2)
    assert agree["mean_abs_gap"] == pytest.approx((0.2 + 0.05 + 0.1) / 3)
    assert agree["rho"] == pytest.approx(0.5)


def test_summary_counts_early_stopped_retrained_folds_only(tmp_path):
    final = tmp_path / "m_glyphs" / "final"
    final.mkdir(parents=True)
    rows = [(0, "separated", f, "best_trial", "search") for f in range(4)]
    rows += [(1, "separated", f, "retrained", "patience" if f < 3 else "max_epochs")
             for f in range(4)]
    rows += [(1, "concatenated", -1, "retrained", "")]
    pd.DataFrame([{"reproduction": r, "mode": m, "fold": f, "source": s, "stop": st,
                   "best_epoch": 10, "map_at_r": 0.5} for r, m, f, s, st in rows]).to_csv(
        final / "test_metrics.csv", index=False)
    summary = [{"mode": mode, "metric": "map_at_r", "mean": mean, "std": 0.0, "ci95": 0.01,
                "n": 2} for mode, mean in (("concatenated", 0.6), ("separated", 0.5))]
    (final / "summary.json").write_text(json.dumps({"summary": summary,
                                                    "untrained": {"map_at_r": 0.2}}))
    row = driver().summarise(tmp_path, ["m_glyphs"]).iloc[0]
    assert (row.final_folds, row.early_stopped) == (4, 3)
    assert (row.concatenated_map_at_r, row.untrained_map_at_r) == (0.6, 0.2)
    table = driver().markdown(pd.DataFrame([row]))
    assert table.splitlines()[1].count("---") == len(row) and "0.6000" in table


def run_args(seed=0, trials=10, reproductions=10, grow=False, recheck_top=0, recheck_runs=2):
    import argparse

    return argparse.Namespace(seed=seed, trials=trials, reproductions=reproductions, grow=grow,
                              recheck_top=recheck_top, recheck_runs=recheck_runs,
                              device="cpu")


def test_record_of_a_folder_written_before_batches_becomes_one_batch(tmp_path):
    old = {"seed": 0, "methods": ["a"], "jobs": 2, "threads": 1, "trials": 10,
           "reproductions": 10, "prepare_seconds": 9.0, "studies_wall_seconds": 100.0,
           "runs": [{"study": "a_glyphs", "exit": 0, "seconds": 99.0}], "failed": [],
           "cpu_count": 2, "table": []}
    (tmp_path / "comparison.json").write_text(json.dumps(old))
    record = driver().load_record(tmp_path, run_args())
    assert record["batches"] == [{k: old[k] for k in (
        "methods", "jobs", "threads", "prepare_seconds", "studies_wall_seconds", "runs",
        "failed", "cpu_count")}]
    lines = driver().comparison_markdown(record, pd.DataFrame(), [])
    assert "- wall time of all batches: 100 s" in lines


@pytest.mark.parametrize("args", [run_args(seed=1), run_args(trials=4),
                                  run_args(reproductions=2)])
def test_extending_a_folder_with_another_budget_or_seed_is_refused(tmp_path, args):
    (tmp_path / "comparison.json").write_text(json.dumps(
        {"seed": 0, "trials": 10, "reproductions": 10, "batches": []}))
    with pytest.raises(SystemExit, match="not"):
        driver().load_record(tmp_path, args)
    assert driver().load_record(tmp_path, run_args())["batches"] == []


def test_a_larger_budget_is_refused_without_grow_and_taken_with_it(tmp_path):
    batch = {"methods": ["a"], "runs": []}
    (tmp_path / "comparison.json").write_text(json.dumps(
        {"seed": 0, "trials": 10, "reproductions": 10, "batches": [batch]}))
    with pytest.raises(SystemExit, match="add --grow"):
        driver().load_record(tmp_path, run_args(trials=20))
    record = driver().load_record(tmp_path, run_args(trials=20, grow=True))
    assert (record["trials"], record["reproductions"]) == (20, 10)
    assert record["batches"] == [{**batch, "trials": 10, "reproductions": 10,
                                  "recheck_top": 0, "recheck_runs": 0}]


def test_the_recheck_opt_in_is_a_budget_of_its_own_and_never_silent(tmp_path):
    """A record from before the recheck existed ran without it; adding it needs --grow (the
    search is kept, the tested trial may change), and every study's argv carries it."""
    out = tmp_path
    batch = {"methods": ["a"], "jobs": 2, "threads": 1, "prepare_seconds": 9.0,
             "studies_wall_seconds": 100.0, "runs": [], "cpu_count": 2}
    (out / "comparison.json").write_text(json.dumps(
        {"seed": 0, "trials": 10, "reproductions": 10, "batches": [batch]}))
    assert driver().load_record(out, run_args(recheck_runs=5))["batches"] == [batch]
    with pytest.raises(SystemExit, match="add --grow"):
        driver().load_record(out, run_args(recheck_top=3))
    record = driver().load_record(out, run_args(recheck_top=3, grow=True))
    assert (record["recheck_top"], record["recheck_runs"]) == (3, 2)
    assert record["batches"][0]["recheck_top"] == 0
    record["batches"].append({**batch, "trials": 10, "reproductions": 10, "recheck_top": 3,
                              "recheck_runs": 2})
    lines = driver().comparison_markdown(record, pd.DataFrame(), [])
    assert "recheck-top, not MLRC" in lines[2]
    assert lines[4].endswith("at 10 trials and 10 retrainings, MLRC's best trial tested")
    assert lines[5].endswith("at 10 trials and 10 retrainings, the best 3 trials rechecked x 2")
    argv = driver().study_argv("a_glyphs", run_args(recheck_top=3), out)
    assert "final.recheck_top=3" in argv and "final.recheck_runs=2" in argv
    assert not [a for a in driver().study_argv("a_glyphs", run_args(), out)
                if a.startswith("final.")]
    (out / "comparison.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="--grow may only raise"):
        driver().load_record(out, run_args(grow=True))  # back to MLRC's rule: not a growth


def test_a_config_from_before_the_recheck_compares_as_mlrcs_rule():
    protocol = driver().protocol
    before = {"search": {"trials": 10}, "final": {"reproductions": 10}}
    mlrc = {"search": {"trials": 10}, "final": {"reproductions": 10, "recheck_top": 0,
                                                "recheck_runs": 2}}
    rechecked = {"search": {"trials": 10}, "final": {"reproductions": 10, "recheck_top": 3,
                                                     "recheck_runs": 2}}
    assert protocol(before, None) == protocol(mlrc, None) != protocol(rechecked, None)


@pytest.mark.parametrize("args", [run_args(trials=4, grow=True),
                                  run_args(trials=20, reproductions=5, grow=True),
                                  run_args(seed=1, trials=20, grow=True)])
def test_grow_never_shrinks_a_budget_or_changes_the_seed(tmp_path, args):
    (tmp_path / "comparison.json").write_text(json.dumps(
        {"seed": 0, "trials": 10, "reproductions": 10, "batches": []}))
    with pytest.raises(SystemExit, match="--grow may only raise"):
        driver().load_record(tmp_path, args)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"seed": 0}'])
def test_a_foreign_or_torn_record_is_refused_and_kept(tmp_path, text):
    (tmp_path / "comparison.json").write_text(text)
    with pytest.raises(SystemExit, match="not a comparison record.*another --out"):
        driver().load_record(tmp_path, run_args())
    assert (tmp_path / "comparison.json").read_text() == text


def test_unknown_method_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="unknown method.*nope.*registered"):
        driver().main(["run", "--methods", "proxy_anchor,nope", "--out", str(tmp_path)])
    assert not (tmp_path / "comparison.json").exists()


def test_significance_agreement_sorts_pairs_by_replication():
    def tests(rows):
        return pd.DataFrame([{"mode": "concatenated", "metric": "map_at_r", "method_a": a,
                              "method_b": b, "diff": d, "significant": s} for a, b, d, s in rows])

    seed0 = tests([("x", "y", 0.02, True), ("x", "z", 0.03, True), ("y", "z", 0.01, True),
                   ("w", "x", 0.01, False)])
    # x-y replicated (listed the other way round), x-z reversed, y-z only in seed 0, w-x neither
    seed1 = tests([("y", "x", -0.01, True), ("x", "z", -0.02, True), ("y", "z", 0.01, False),
                   ("w", "x", 0.0, False)])
    lines = driver().significance_agreement(seed0, seed1, 0, 1)
    assert "4 pairs" in lines[0]
    assert ("both, same direction: 1; both, opposite directions: 1; one seed only: 1; "
            "neither: 1") in lines[0]
    # which pairs: each listed under its case, better method first
    text = "\n".join(lines)
    same, opposite, one = (text.index(h) for h in (
        "in both seeds, the same way", "in both seeds, in opposite", "in one seed only"))
    assert same < text.index("- x > y") < opposite < text.index("- x > z") < one
    assert text.index("- y > z (seed 0)") > one
    assert "Not significant in either seed: w vs x." in text


def test_report_labels_become_method_names():
    name = driver().method_name
    assert name("proxy_anchor_glyphs [embedded]") == name("proxy_anchor_glyphs") == "proxy_anchor"


def test_both_seeds_table_orders_by_mean_and_ends_with_the_untrained_floor():
    def frame(scores):
        return pd.DataFrame([{"study": s, "concatenated_map_at_r": v, "ci95": 0.01,
                              "untrained_map_at_r": 0.2, "final_folds": 40,
                              "early_stopped": e} for s, (v, e) in scores.items()]
                            ).set_index("study")

    seed0 = frame({"a_glyphs": (0.40, 40), "b_glyphs": (0.30, 31), "c_glyphs": (0.35, 40)})
    seed1 = frame({"a_glyphs": (0.30, 39), "b_glyphs": (0.38, 30), "c_glyphs": (0.36, 40),
                   "d_glyphs": (0.5, 40)})  # d: one seed only, left out
    table = driver().both_seeds_table([("s0", 0, seed0), ("s1", 1, seed1)],
                                      ["a_glyphs", "b_glyphs", "c_glyphs"])
    assert list(table["method"]) == ["c", "a", "b",
                                     "untrained (pretrained trunk, random embedder)"]
    c = table.iloc[0]
    assert (c["seed 0"], c["rank 0"], c["seed 1"], c["rank 1"]) == (
        "0.3500 ± 0.0100", 2, "0.3600 ± 0.0100", 2)
    assert c["mean"] == pytest.approx(0.355)
    assert table.iloc[2]["early-stopped final folds"] == "31/40 / 30/40"
    assert table.iloc[3]["seed 0"] == "0.2000"


@pytest.mark.parametrize("text", ["{not json", '{"seed": 0}', None])  # None: no record at all
def test_spearman_of_a_torn_or_missing_record_is_a_clear_refusal(tmp_path, text):
    write_comparison(tmp_path / "s0", 0, {"a": 0.9, "b": 0.8})
    (tmp_path / "s1").mkdir()
    if text is not None:
        (tmp_path / "s1" / "comparison.json").write_text(text)
    with pytest.raises(SystemExit, match="s1/comparison.json is not a comparison record"):
        driver().main(["spearman", str(tmp_path / "s0"), str(tmp_path / "s1"),
                       "--out", str(tmp_path / "seeds.md")])
    assert not (tmp_path / "seeds.md").exists()


TRUNK = "87728e69" * 8


def planned_config(study: str, seed: int = 0, out=None) -> dict:
    """The config `run` would give `study` (what harness.run writes as config.json)."""
    from harness.run import parse_args, resolve_config

    args = run_args(seed=seed)
    args.device = "cpu"
    argv = driver().study_argv(study, args, out or REPO)
    return json.loads(json.dumps(resolve_config(parse_args(argv)).to_dict()))


def write_finished_study(out, study: str, config: dict, trunk: str | None,
                         torch_versions: tuple[str, ...] = ()) -> None:
    """A study folder as a finished run leaves it, as far as the protocol check reads it: one
    invocation per torch version given (none: a record without versions)."""
    (out / study / "final").mkdir(parents=True)
    (out / study / "final" / "summary.json").write_text("{}")
    (out / study / "config.json").write_text(json.dumps(config))
    weights = {"trunk_weights": {"file": "t.pt", "sha256": trunk}} if trunk else {}
    invocations = [{"command": "x", "versions": {"torch": v, "pytorch-metric-learning": "2.9.0"},
                    **weights} for v in torch_versions] or [{"command": "x", **weights}]
    (out / study / "provenance.json").write_text(json.dumps(invocations))


def folder_with(tmp_path, config: dict, trunk: str | None):
    write_finished_study(tmp_path, "proxy_anchor_glyphs", config, trunk)
    (tmp_path / "comparison.json").write_text(json.dumps(
        {"seed": 0, "trials": 10, "reproductions": 10, "batches": [
            {"methods": ["proxy_anchor"], "runs": [
                {"study": "proxy_anchor_glyphs", "exit": 0, "seconds": 1.0}]}]}))


@pytest.mark.parametrize("change, trunk, refused", [
    (None, TRUNK, None),
    (None, None, None),  # a study from before trunk hashes were recorded: nothing to compare
    (None, "0" * 64, "trunk sha256"),  # a rebuilt or other trunk file
    (("train", "max_epochs", 80), TRUNK, "train.max_epochs: 80 vs 50"),  # the profile changed
    (("search", "sampler", "tpe"), TRUNK, "search.sampler: 'tpe' vs 'gp'"),
])
def test_adding_methods_under_another_protocol_is_refused_before_training(
        tmp_path, monkeypatch, change, trunk, refused):
    config = planned_config("proxy_anchor_glyphs", out=tmp_path)
    if change:
        section, key, value = change
        config[section][key] = value
    folder_with(tmp_path, config, trunk)
    module = driver()
    if not refused:
        args = run_args()
        args.device = "cpu"
        record = module.load_record(tmp_path, args)
        module.check_extends_alike(tmp_path, record, ["cosface_glyphs"], args,
                                   {"sha256": TRUNK})
        return
    monkeypatch.setattr(module, "prepare_once", lambda: {"sha256": TRUNK})
    trained = []
    monkeypatch.setattr(module, "run_study", lambda s, a, o: trained.append(s))
    with pytest.raises(SystemExit, match=f"cosface_glyphs .*proxy_anchor_glyphs.*{refused}"):
        module.main(["run", "--methods", "cosface", "--out", str(tmp_path)])
    assert trained == []
    assert len(json.loads((tmp_path / "comparison.json").read_text())["batches"]) == 1


def test_a_protocol_with_every_pair_compared_catches_a_trunk_after_an_unrecorded_one():
    protocols = {"old": {"a": 1, "trunk sha256": None}, "mid": {"a": 1, "trunk sha256": "x"},
                 "new": {"a": 1, "trunk sha256": "y"}}
    with pytest.raises(SystemExit, match="new and mid .*trunk sha256: 'x' vs 'y'"):
        driver().refuse_mixed_protocols(protocols, "here")
    driver().refuse_mixed_protocols({k: protocols[k] for k in ("old", "mid")}, "here")


def test_trunks_are_compared_by_their_tensors_where_both_studies_record_them():
    """Two files with the same tensors (another serialisation of one trunk) are one trunk;
    folders from before tensor hashes were recorded fall back to the file's hash."""
    differences = driver().differences
    same_tensors = ({"a": 1, "trunk sha256": "x", "trunk tensors sha256": "t"},
                    {"a": 1, "trunk sha256": "y", "trunk tensors sha256": "t"})
    assert differences(*same_tensors) == []
    assert differences({"a": 1, "trunk sha256": "x", "trunk tensors sha256": "t"},
                       {"a": 1, "trunk sha256": "x", "trunk tensors sha256": "u"}) == [
        "trunk tensors sha256: 't' vs 'u'"]
    assert differences({"a": 1, "trunk sha256": "x", "trunk tensors sha256": None},
                       {"a": 1, "trunk sha256": "y", "trunk tensors sha256": "t"}) == [
        "trunk sha256: 'x' vs 'y'"]
    protocol = driver().protocol({"loss": {"name": "x"}, "train": {"lr": 1}},
                                 {"file": "f", "sha256": "x", "tensors_sha256": "t"})
    assert protocol == {"train.lr": 1, "trunk sha256": "x", "trunk tensors sha256": "t",
                        "libraries": None, "data fingerprint": None,
                        "final.recheck_top": 0, "final.recheck_runs": 2}  # as before them


def test_studies_on_different_data_are_not_one_protocol(tmp_path):
    """The split manifest's data fingerprint, where both studies record it, must agree."""
    config = planned_config("proxy_anchor_glyphs", out=tmp_path)
    for name, print_ in (("a", "1" * 64), ("b", "2" * 64), ("c", None)):
        write_finished_study(tmp_path, name, config, TRUNK)
        if print_:
            (tmp_path / name / "split_manifest.json").write_text(
                json.dumps({"data_fingerprint": print_, "data_fingerprint_version": 1}))
    protocols = {n: driver().recorded_protocol(tmp_path / n) for n in "abc"}
    assert protocols["a"]["data fingerprint"] == "1" * 64
    assert protocols["c"]["data fingerprint"] is None
    with pytest.raises(SystemExit, match="data fingerprint: '1+' vs '2+'"):
        driver().refuse_mixed_protocols({n: protocols[n] for n in "ab"}, "here")
    driver().refuse_mixed_protocols({n: protocols[n] for n in "ac"}, "here")


def test_adding_methods_beside_studies_that_record_their_data_compares_the_data(tmp_path):
    """A folder's studies record their data's fingerprint (split_manifest.json): the next
    batch is compared with it, and runs on the same data (accepted) or not (refused)."""
    from harness.config import load_study
    from harness.data import study_records

    module = driver()
    folder_with(tmp_path, planned_config("proxy_anchor_glyphs", out=tmp_path), TRUNK)
    manifest = tmp_path / "proxy_anchor_glyphs" / "split_manifest.json"
    glyphs = study_records(load_study("proxy_anchor_glyphs", profile="embedded")).fingerprint()
    args = run_args()
    args.device = "cpu"
    record = module.load_record(tmp_path, args)
    manifest.write_text(json.dumps({"data_fingerprint": glyphs, "data_fingerprint_version": 1}))
    module.check_extends_alike(tmp_path, record, ["cosface_glyphs"], args, {"sha256": TRUNK})
    manifest.write_text(json.dumps({"data_fingerprint": "0" * 64, "data_fingerprint_version": 1}))
    with pytest.raises(SystemExit, match="data fingerprint: '0+' vs '" + glyphs):
        module.check_extends_alike(tmp_path, record, ["cosface_glyphs"], args,
                                   {"sha256": TRUNK})


def test_a_setting_one_study_lacks_is_a_difference_that_says_so():
    """train.tf32 came after some folders were written: a study without it is not the same
    protocol as one with it set (None must not pass for a value that was never chosen)."""
    old, new = {"a": 1, "trunk sha256": "x"}, {"a": 1, "train.tf32": False, "trunk sha256": "x"}
    with pytest.raises(SystemExit, match=r"train\.tf32: absent \(an older harness\) vs False"):
        driver().refuse_mixed_protocols({"old": old, "new": new}, "here")
    unset = {"a": 1, "train.x": None, "trunk sha256": "x"}
    assert driver().differences({"a": 1, "trunk sha256": "x"}, unset) == [
        "train.x: absent (an older harness) vs None"]


def test_spearman_refuses_seeds_run_under_different_protocols(tmp_path):
    for seed, epochs in ((0, 50), (1, 80)):
        run = tmp_path / f"s{seed}"
        write_comparison(run, seed, {"cosface_glyphs": 0.5, "proxy_anchor_glyphs": 0.4})
        for study in ("cosface_glyphs", "proxy_anchor_glyphs"):
            config = planned_config(study, seed=seed)
            config["train"]["max_epochs"] = epochs if study == "cosface_glyphs" else 50
            write_finished_study(run, study, config, TRUNK)
    argv = ["spearman", str(tmp_path / "s0"), str(tmp_path / "s1"),
            "--out", str(tmp_path / "seeds.md")]
    with pytest.raises(SystemExit, match="spearman: .*s1/cosface_glyphs.*max_epochs: 50 vs 80"):
        driver().main(argv)
    assert not (tmp_path / "seeds.md").exists()
    config = json.loads((tmp_path / "s1" / "cosface_glyphs" / "config.json").read_text())
    config["train"]["max_epochs"] = 50  # the seeds now differ in the seed only: compared
    (tmp_path / "s1" / "cosface_glyphs" / "config.json").write_text(json.dumps(config))
    assert driver().main(argv) == 0


@pytest.mark.parametrize("versions_1, refused", [
    (("2.14.1",), False),
    ((), False),  # a study from before versions were recorded: nothing to compare
    (("2.11.0",), True),  # SoftTriple's gradients differ between these (docs/embedded.md)
    (("2.14.1", "2.11.0"), True),  # one study finished under another torch
])
def test_spearman_refuses_seeds_run_with_other_torch_versions(tmp_path, versions_1, refused):
    for seed, versions in ((0, ("2.14.1",)), (1, versions_1)):
        run = tmp_path / f"s{seed}"
        write_comparison(run, seed, {"cosface_glyphs": 0.5, "proxy_anchor_glyphs": 0.4})
        for study in ("cosface_glyphs", "proxy_anchor_glyphs"):
            write_finished_study(run, study, planned_config(study, seed=seed), TRUNK,
                                 versions if study == "cosface_glyphs" else ("2.14.1",))
    argv = ["spearman", str(tmp_path / "s0"), str(tmp_path / "s1"),
            "--out", str(tmp_path / "seeds.md")]
    if not refused:
        assert driver().main(argv) == 0
        return
    with pytest.raises(SystemExit, match="s1/cosface_glyphs.*libraries: 'torch 2.14.1, "
                                         "pytorch-metric-learning 2.9.0' vs 'torch "):
        driver().main(argv)


@pytest.mark.parametrize("damaged", ["config.json", "provenance.json"])
def test_a_damaged_study_folder_is_a_clear_refusal_before_training(tmp_path, damaged):
    folder_with(tmp_path, planned_config("proxy_anchor_glyphs", out=tmp_path), TRUNK)
    (tmp_path / "proxy_anchor_glyphs" / damaged).write_text("{torn")
    args = run_args()
    args.device = "cpu"
    record = driver().load_record(tmp_path, args)
    with pytest.raises(SystemExit, match="proxy_anchor_glyphs: config.json/provenance.json "
                                         "unreadable"):
        driver().check_extends_alike(tmp_path, record, ["cosface_glyphs"], args,
                                     {"sha256": TRUNK})
    assert (tmp_path / "proxy_anchor_glyphs" / damaged).read_text() == "{torn"


def test_run_records_the_studies_in_their_order_whatever_order_they_finish(tmp_path,
                                                                           monkeypatch):
    import time

    module = driver()
    monkeypatch.setattr(module, "prepare_once", lambda: {"sha256": TRUNK})
    monkeypatch.setattr(module.subprocess, "call", lambda *a, **k: 0)  # no report
    delays = {"cosface_glyphs": 0.3, "arcface_glyphs": 0.0, "triplet_glyphs": 0.1}

    def fake_run_study(study, args, out):  # the first study finishes last
        time.sleep(delays[study])
        return {"study": study, "exit": 1, "seconds": delays[study]}

    monkeypatch.setattr(module, "run_study", fake_run_study)
    assert module.main(["run", "--methods", "cosface,arcface,triplet", "--jobs", "2",
                        "--out", str(tmp_path)]) == 1  # every study "failed"
    batch = json.loads((tmp_path / "comparison.json").read_text())["batches"][0]
    assert [r["study"] for r in batch["runs"]] == list(delays)
    assert batch["failed"] == list(delays)


def test_studies_an_interrupted_invocation_finished_are_recorded_as_such(tmp_path, monkeypatch):
    """An invocation stopped before its end records nothing; running it again checks the
    studies it finished in seconds. The record must not pass those seconds off as their cost."""
    module = driver()
    monkeypatch.setattr(module, "prepare_once", lambda: {"sha256": TRUNK})
    monkeypatch.setattr(module, "check_extends_alike", lambda *a: None)
    monkeypatch.setattr(module, "summarise", lambda out, studies: pd.DataFrame())
    monkeypatch.setattr(module.subprocess, "call", lambda *a, **k: 0)  # no report
    finished_study(tmp_path, "cosface_glyphs", 10, in_summary=False)

    def fake_run_study(study, args, out):
        finished_study(out, study, 10, in_summary=True)
        return {"study": study, "exit": 0, "seconds": 2.0}

    monkeypatch.setattr(module, "run_study", fake_run_study)
    assert module.main(["run", "--methods", "cosface,arcface", "--jobs", "1",
                        "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "comparison.json").read_text())["batches"][0]["runs"]
    assert [(r["study"], r["finished_before"]) for r in runs] == [
        ("cosface_glyphs", True), ("arcface_glyphs", False)]
    text = (tmp_path / "comparison.md").read_text()
    assert "of these, 1 (cosface_glyphs) had been run to their end by an earlier" in text
    # once recorded, a later batch that checks them again is not "finished before"
    assert module.main(["run", "--methods", "cosface", "--jobs", "1",
                        "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "comparison.json").read_text())["batches"][1]["runs"]
    assert runs == [{"study": "cosface_glyphs", "exit": 0, "seconds": 2.0,
                     "finished_before": False}]


def test_spearman_compares_runs_that_differ_in_a_setting_it_was_told_of(tmp_path):
    """--differ-in names a setting the runs may differ in (the same seed with and without the
    frozen-block cache); any other difference is still refused, and so is an unknown key."""
    for run, cache, epochs in (("a", False, 50), ("b", True, 50)):
        write_comparison(tmp_path / run, 0, {"cosface_glyphs": 0.5, "proxy_anchor_glyphs": 0.4})
        for study in ("cosface_glyphs", "proxy_anchor_glyphs"):
            config = planned_config(study)
            config["model"]["cache_frozen_features"] = cache
            config["train"]["max_epochs"] = epochs
            write_finished_study(tmp_path / run, study, config, TRUNK)
    out = tmp_path / "agree.md"
    argv = ["spearman", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]
    with pytest.raises(SystemExit, match="model.cache_frozen_features: False vs True"):
        driver().main(argv)
    assert driver().main([*argv, "--differ-in", "model.cache_frozen_features"]) == 0
    text = out.read_text()
    assert "allowed to differ in: model.cache_frozen_features" in text
    assert "| seed 0 (run 1) | rank 0 (run 1) | seed 0 (run 2) | rank 0 (run 2) |" in text
    with pytest.raises(SystemExit, match="--differ-in model.cache_frozen: not a study setting"):
        driver().main([*argv, "--differ-in", "model.cache_frozen"])

    config = json.loads((tmp_path / "b" / "cosface_glyphs" / "config.json").read_text())
    config["train"]["max_epochs"] = 80  # not named: refused
    (tmp_path / "b" / "cosface_glyphs" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="max_epochs: 50 vs 80"):
        driver().main([*argv, "--differ-in", "model.cache_frozen_features"])


def finished_study(out, study: str, trials: int, in_summary: bool) -> None:
    """A study folder finished at `trials` (10 retrainings): the budget in final/summary.json,
    or, as before it was recorded there, in config.json only."""
    (out / study / "final").mkdir(parents=True, exist_ok=True)
    budget = {"trials": trials, "reproductions": 10}
    summary = {"budget": budget} if in_summary else {}
    (out / study / "final" / "summary.json").write_text(json.dumps(summary))
    (out / study / "config.json").write_text(json.dumps(
        {"search": {"trials": trials}, "final": {"reproductions": 10}}))


@pytest.mark.parametrize("in_summary", [True, False])
def test_a_grown_folder_tables_only_the_studies_run_at_its_new_budget(tmp_path, monkeypatch,
                                                                       in_summary):
    """Growing some methods of a folder must not rank them against the others' smaller
    searches, and a study this batch grows is not one 'finished before' it; one that an
    unrecorded invocation already took to the new budget is."""
    module = driver()
    monkeypatch.setattr(module, "prepare_once", lambda: {"sha256": TRUNK})
    monkeypatch.setattr(module, "check_extends_alike", lambda *a: None)
    tabled = []
    monkeypatch.setattr(module, "summarise",
                        lambda out, studies: tabled.append(studies) or pd.DataFrame())
    monkeypatch.setattr(module.subprocess, "call", lambda *a, **k: 0)  # no report
    for study in ("cosface_glyphs", "arcface_glyphs", "triplet_glyphs"):
        finished_study(tmp_path, study, 10, in_summary)
    (tmp_path / "comparison.json").write_text(json.dumps(
        {"seed": 0, "trials": 10, "reproductions": 10, "batches": [
            {"methods": ["cosface", "arcface", "triplet"], "jobs": 2, "threads": 1,
             "cpu_count": 2, "prepare_seconds": 1.0, "studies_wall_seconds": 30.0, "failed": [],
             "runs": [{"study": s, "exit": 0, "seconds": 10.0} for s in
                      ("cosface_glyphs", "arcface_glyphs", "triplet_glyphs")]}]}))
    finished_study(tmp_path, "triplet_glyphs", 20, in_summary)  # grown, then interrupted

    def fake_run_study(study, args, out):
        finished_study(out, study, args.trials, in_summary)
        return {"study": study, "exit": 0, "seconds": 5.0}

    monkeypatch.setattr(module, "run_study", fake_run_study)
    argv = ["run", "--methods", "cosface,triplet", "--trials", "20", "--jobs", "1",
            "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="add --grow"):
        module.main(argv)
    assert module.main(argv + ["--grow"]) == 0
    assert tabled == [["cosface_glyphs", "triplet_glyphs"]]  # arcface is still at 10 trials
    record = json.loads((tmp_path / "comparison.json").read_text())
    assert (record["trials"], record["reproductions"]) == (20, 10)
    assert [(b["trials"], b["reproductions"]) for b in record["batches"]] == [(10, 10), (20, 10)]
    assert [(r["study"], r["finished_before"]) for r in record["batches"][1]["runs"]] == [
        ("cosface_glyphs", False), ("triplet_glyphs", True)]
    text = (tmp_path / "comparison.md").read_text()
    assert "20 trials, best trial + 10 retrainings" in text
    assert "30 s wall (data + trunk preparation before: 1 s), at 10 trials and 10 retrainings" \
        in text
    assert "with 1 batch(es) at a smaller budget: the folder was grown with --grow, so this " \
        "is not the time of one run at its budget" in text


def test_the_early_stopped_share_is_not_rounded_up_to_a_goal():
    """719 of 800 is 89.9%: a goal of 90% is not met, and the record must not print 90%."""
    record = {"seed": 0, "trials": 20, "reproductions": 10, "batches": []}
    table = pd.DataFrame([{"study": "a_glyphs", "concatenated_map_at_r": 0.3,
                           "early_stopped": 719, "final_folds": 800}])
    lines = driver().comparison_markdown(record, table, [])
    assert "- final (retrained) folds ended by early stopping: 719 / 800 (89.9%)" in lines
