"""benchmarks/more_trials.py: copies are grown, never the originals; a folder from before
train.tf32 is grown only when it ran on the CPU."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script


def study_folder(path, devices, tf32=None, torch_versions=None):
    path.mkdir(parents=True)
    train = {"lr": 0.001} if tf32 is None else {"lr": 0.001, "tf32": tf32}
    (path / "config.json").write_text(json.dumps({"seed": 0, "train": train}))
    torch_versions = torch_versions or ["2.14.1"] * len(devices)
    (path / "provenance.json").write_text(json.dumps(
        [{"hardware": {"device": d}, "versions": {"torch": v}}
         for d, v in zip(devices, torch_versions)]))
    (path / ".lock").write_text("")
    return path


def test_a_cpu_run_from_before_tf32_is_copied_with_tf32_off(tmp_path):
    source = study_folder(tmp_path / "src" / "m_glyphs", ["cpu", "cpu"])
    target = tmp_path / "out" / "m_glyphs"
    benchmark_script("more_trials").copy_study(source, target)
    assert json.loads((target / "config.json").read_text())["train"]["tf32"] is False
    assert "tf32" not in json.loads((source / "config.json").read_text())["train"]
    assert not (target / ".lock").exists()  # the copy starts unlocked


@pytest.mark.parametrize("devices", [["cpu", "cuda"], ["cuda:0"], []])
def test_a_run_that_may_have_used_tf32_is_refused(tmp_path, devices):
    source = study_folder(tmp_path / "src" / "m_glyphs", devices)
    with pytest.raises(SystemExit, match="predates train.tf32"):
        benchmark_script("more_trials").copy_study(source, tmp_path / "out" / "m_glyphs")


def test_a_recorded_tf32_is_left_as_it_is(tmp_path):
    source = study_folder(tmp_path / "src" / "m_glyphs", ["cuda"], tf32=True)
    target = tmp_path / "out" / "m_glyphs"
    benchmark_script("more_trials").copy_study(source, target)
    assert json.loads((target / "config.json").read_text())["train"]["tf32"] is True


def test_a_run_from_before_the_collapse_gradient_setting_is_copied_with_what_it_computed(
        tmp_path):
    """torch 2.14's clamp gave SoftTriple's regulariser the gradient 0 at collapsed centers, and
    the harness kept it on every torch since: such a copy resumes under "zero"."""
    source = study_folder(tmp_path / "src" / "m_glyphs", ["cpu", "cpu"],
                          torch_versions=["2.14.1", "2.14.1+cpu"])
    target = tmp_path / "out" / "m_glyphs"
    benchmark_script("more_trials").copy_study(source, target)
    train = json.loads((target / "config.json").read_text())["train"]
    assert train["center_collapse_gradient"] == "zero"


@pytest.mark.parametrize("versions", [["2.14.1", "2.11.0"], ["2.9"], ["?"], ["2.14.0a0+git12"]])
def test_a_run_under_an_older_torch_is_refused(tmp_path, versions):
    source = study_folder(tmp_path / "src" / "m_glyphs", ["cpu"] * len(versions),
                          torch_versions=versions)
    target = tmp_path / "out" / "m_glyphs"
    with pytest.raises(SystemExit, match="predates train.center_collapse_gradient"):
        benchmark_script("more_trials").copy_study(source, target)
    # Refused before anything is written: the copy's config is the original's.
    assert (target / "config.json").read_text() == (source / "config.json").read_text()


def test_a_copy_is_grown_with_the_comparisons_own_arguments(tmp_path, monkeypatch):
    """The same arguments as embedded_comparison.py run (so the copy resumes as the same
    study), more trials, the search stage only, in the copy's folder."""
    module = benchmark_script("more_trials")
    folder = tmp_path / "seed_1" / "m_glyphs"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"final": {"reproductions": 10}}))
    calls = []
    monkeypatch.setattr(module, "run_study", lambda study, args, out, extra: calls.append(
        (study, args, out, extra)) or {"study": study, "exit": 0, "seconds": 1.0})
    assert module.grow(folder, "m_glyphs", 1, 20) == {"seed": 1, "study": "m_glyphs",
                                                      "exit": 0, "seconds": 1.0}
    study, args, out, extra = calls[0]
    argv = benchmark_script("embedded_comparison").study_argv(study, args, out)
    assert argv[argv.index("--output") + 1] == str(folder)
    assert argv[argv.index("--trials") + 1] == "20" and "seed=1" in argv
    assert argv[argv.index("--reproductions") + 1] == "10" and extra == ("--stage", "search")
