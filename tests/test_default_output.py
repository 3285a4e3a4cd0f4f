"""Where runs go by default: the git-ignored runs/, never the committed reference runs in
results/. (With results/ as the default, a fresh clone's first `harness.run --study quickstart`
resumed the committed results/quickstart, trained nothing of the search, and rewrote tracked
files; `harness.report` mixed the user's runs with the committed ones.)"""

from __future__ import annotations

import inspect
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.report import cli as report_cli
from harness.report.build import build_report
from harness.report.runs import DEFAULT_OUT, RUNS_DIR
from harness.run import output_dir, parse_args, resolve_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, expected", [
    (["--study", "quickstart"], "runs/quickstart"),
    (["--study", "proxy_anchor_cub", "--profile", "embedded"], "runs/embedded/proxy_anchor_glyphs"),
])
def test_runs_default_to_the_ignored_runs_folder(argv, expected):
    args = parse_args(argv)
    out = output_dir(args, resolve_config(args))
    assert out == REPO / expected
    assert not out.resolve().is_relative_to((REPO / "results").resolve())


def test_an_explicit_output_is_kept():
    args = parse_args(["--study", "quickstart", "--output", "results/quickstart"])
    assert output_dir(args, resolve_config(args)) == Path("results/quickstart")


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="needs a git clone")
def test_git_ignores_default_run_folders_and_reports():
    for path in (RUNS_DIR / "quickstart" / "config.json", DEFAULT_OUT / "README.md"):
        assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode == 0


def test_report_reads_and_writes_runs_by_default(monkeypatch):
    seen = {}

    def fake_build_report(run_dirs, out, plots):
        seen.update(run_dirs=run_dirs, out=out)
        raise HarnessError("stop here")

    monkeypatch.setattr(report_cli, "build_report", fake_build_report)
    assert report_cli.main([]) == 2
    assert seen == {"run_dirs": None, "out": REPO / "runs" / "report"}
    assert inspect.signature(build_report).parameters["runs_dir"].default == REPO / "runs"


def test_a_run_in_the_earlier_default_folder_is_pointed_out_not_resumed(tmp_path, monkeypatch):
    from harness import run as run_mod

    monkeypatch.setattr(run_mod, "RUNS_DIR", tmp_path / "runs")
    earlier = tmp_path / "results" / "embedded" / "proxy_anchor_glyphs"
    earlier.mkdir(parents=True)
    args = parse_args(["--study", "proxy_anchor_cub", "--profile", "embedded"])
    out = output_dir(args, resolve_config(args))
    assert out == tmp_path / "runs" / "embedded" / "proxy_anchor_glyphs"
    assert run_mod.note_earlier_default(args, out) == ""  # no run there: nothing to say
    (earlier / "config.json").write_text("{}")
    note = run_mod.note_earlier_default(args, out)
    assert f"{earlier} holds an earlier run" in note and f"--output {earlier}" in note
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # the new folder exists: it is what resumes
    assert run_mod.note_earlier_default(args, out) == ""
    explicit = parse_args(["--study", "proxy_anchor_cub", "--profile", "embedded",
                           "--output", str(tmp_path / "x")])
    assert run_mod.note_earlier_default(explicit, tmp_path / "x") == ""
