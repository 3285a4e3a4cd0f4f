"""Scheduler launchers (submitit), journal storage, secrets and GPU ids of harness.workers."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from harness import bench, cluster, storage, workers
from harness.errors import ConfigError, HarnessError
from harness.search import open_study
from harness.storage import (HEARTBEAT_ATTR, HeartbeatJournalStorage, fail_dead_local_trials,
                             journal_path, open_storage, redact_url)
from harness.workers import main as workers_main
from conftest import kill_worker_mid_trial, write_study

SECRET = "s3cr3t-pw"
PG_URL = f"postgresql+psycopg://harness:{SECRET}@dbhost:5432/harness"
FAST_ENV = {"HARNESS_NO_PROGRESS": "1", "HARNESS_HEARTBEAT_S": "1", "HARNESS_GRACE_S": "3"}


def tiny_study(tmp_path: Path, glyph_root: Path, trials: int, iters: int = 3) -> Path:
    path = write_study(tmp_path, glyph_root, iters=iters)
    path.write_text(path.read_text().replace("trials = 2", f"trials = {trials}"))
    return path


def load_journal(path: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(path)))


# --------------------------------------------------------------------------------------------
# GPU ids (robustness: `--gpus a,b` gave a raw traceback or nonsense)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus, message", [("a,b", "'a' is not a GPU index"),
                                           ("0,cuda:1", "'cuda:1' is not a GPU index"),
                                           ("-1", "'-1' is not a GPU index"),
                                           ("0,0", "listed twice")])
def test_bad_gpu_ids_are_a_clear_error(gpus, message, capsys):
    assert workers_main(["--study", "quickstart", "--gpus", gpus, "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpus") and message in err and "Traceback" not in err


def test_workers_per_gpu_sets_the_worker_count():
    args, _ = workers.parse_args(["--gpus", "0,1", "--workers-per-gpu", "3"])
    assert args.workers == 6 and args.gpu_list == ["0", "1"]
    with pytest.raises(ConfigError, match="contradicts"):
        workers.parse_args(["--gpus", "0,1", "--workers-per-gpu", "3", "--workers", "2"])
    with pytest.raises(ConfigError, match="needs --gpus"):
        workers.parse_args(["--workers-per-gpu", "2"])
    with pytest.raises(ConfigError, match="--time"):
        workers.parse_args(["--launcher", "slurm", "--jobs", "2"])
    with pytest.raises(ConfigError, match="scheduler picks the GPUs"):
        workers.parse_args(["--launcher", "slurm", "--time", "9", "--gpus", "0"])


class FakeProc:
    pid, returncode = 4242, 0

    def poll(self):
        return 0


def test_worker_command_lines_and_output_hold_no_password(tmp_path, monkeypatch, capsys):
    """K workers per GPU, CUDA_VISIBLE_DEVICES round-robin, and the storage URL (a password)
    only in the workers' environment: not on a command line (`ps`), not in the launcher's
    output."""
    calls = []
    monkeypatch.setattr(workers, "prepare", lambda rest: (tmp_path, PG_URL))
    monkeypatch.setattr(workers, "POLL_SECONDS", 0)
    monkeypatch.setattr(workers.subprocess, "Popen",
                        lambda cmd, env, **kw: calls.append((cmd, env)) or FakeProc())
    monkeypatch.setattr(workers.subprocess, "call",
                        lambda cmd, env, **kw: calls.append((cmd, env)) or 0)
    assert workers_main(["--study", "quickstart", "--gpus", "3,5", "--workers-per-gpu", "2",
                         "--storage", PG_URL, "--device", "cuda"]) == 0
    assert len(calls) == 5  # 2 GPUs x 2 search workers, then the final stage
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in calls] == ["3", "5", "3", "5", "3"]
    for cmd, env in calls:
        assert not any(SECRET in arg for arg in cmd), cmd
        assert "--storage" not in cmd and cmd[1:4] == ["-m", "harness.workers", "--worker"]
        assert env[workers.STORAGE_ENV] == PG_URL
    assert [cmd[-1] for cmd, _ in calls] == ["search"] * 4 + ["final"]
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err and "harness:***@dbhost" in out.out


def test_worker_reads_the_storage_from_the_environment(monkeypatch):
    seen = []
    monkeypatch.setattr("harness.run.main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setenv(workers.STORAGE_ENV, PG_URL)
    assert workers_main([workers.WORKER_FLAG, "--study", "x", "--stage", "search"]) == 0
    assert seen == [["--study", "x", "--stage", "search", "--storage", PG_URL]]
    assert workers.STORAGE_ENV not in os.environ  # not inherited by the worker's children
    assert workers_main([workers.WORKER_FLAG, "--study", "x"]) == 2  # unset: a clear error


def test_storage_errors_and_urls_are_redacted():
    assert redact_url(PG_URL) == "postgresql+psycopg://harness:***@dbhost:5432/harness"
    assert redact_url(f"could not parse postgresql://u:{SECRET}@h:x/db") == \
        "could not parse postgresql://u:***@h:x/db"
    assert redact_url("/shared/run/study.journal") == "/shared/run/study.journal"
    with pytest.raises(ConfigError) as e:  # a malformed port: SQLAlchemy quotes the URL
        open_storage(f"postgresql+psycopg://harness:{SECRET}@dbhost:port/db")
    assert SECRET not in str(e.value) and "cannot open the Optuna storage" in str(e.value)


# --------------------------------------------------------------------------------------------
# Journal storage: URL forms, heartbeats, dead-trial retry
# --------------------------------------------------------------------------------------------
def test_journal_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert journal_path("runs/study.journal") == tmp_path / "runs" / "study.journal"
    assert journal_path(f"journal://{tmp_path}/a.log") == tmp_path / "a.log"
    assert journal_path("sqlite:///x.db") is None and journal_path(PG_URL) is None
    assert storage.normalize_storage("s.journal") == f"journal://{tmp_path}/s.journal"
    with pytest.raises(ConfigError, match="does not exist"):
        open_storage(str(tmp_path / "missing" / "s.journal"))


def test_journal_storage_has_heartbeats_and_retries_stale_trials(tmp_path, monkeypatch):
    """Optuna 5's JournalStorage has no heartbeat: a trial of a worker killed on another host
    would stay RUNNING for ever. Ours declares it stale after the grace period without a beat,
    measured on the reader's clock, and Optuna's retry callback re-queues it."""
    monkeypatch.setenv("HARNESS_GRACE_S", "10")
    url = str(tmp_path / "study.journal")
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    trial.report(0.5, step=1)
    writer = study._storage
    reader = open_storage(url)  # another process, another host
    assert isinstance(reader, HeartbeatJournalStorage)
    assert optuna.storages._heartbeat.is_heartbeat_enabled(reader)
    clock = [1000.0]
    reader._clock = lambda: clock[0]
    reader_study = optuna.load_study(study_name="s", storage=reader)
    writer.record_heartbeat(trial._trial_id)
    optuna.storages.fail_stale_trials(reader_study)  # first sight: not stale
    clock[0] += 9
    writer.record_heartbeat(trial._trial_id)  # alive: a new beat restarts the grace period
    optuna.storages.fail_stale_trials(reader_study)
    clock[0] += 9
    optuna.storages.fail_stale_trials(reader_study)
    assert reader_study.trials[0].state == TrialState.RUNNING
    assert reader_study.trials[0].system_attrs[HEARTBEAT_ATTR] == 2
    clock[0] += 2  # 11 s without a beat > 10 s grace
    optuna.storages.fail_stale_trials(reader_study)
    trials = load_journal(tmp_path / "study.journal", "s").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == {"x": x} and trials[1].system_attrs["failed_trial"] == 0
    assert trials[1].intermediate_values == {1: 0.5}
    writer.record_heartbeat(trial._trial_id)  # the presumed-dead worker beats again: ignored


def test_journal_dead_local_trial_is_retried_once(tmp_path):
    """Several workers on this host find one dead worker's trial at the same moment: the
    journal's log order lets exactly one of them fail it and queue the retry."""
    url = str(tmp_path / "study.journal")
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", dead.pid)
    barrier, results = threading.Barrier(4), []

    def worker():
        s = optuna.load_study(study_name="s", storage=open_storage(url))
        barrier.wait()
        results.append(fail_dead_local_trials(s))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(len, results)) == [0, 0, 0, 1]
    states = [t.state for t in load_journal(tmp_path / "study.journal", "s").trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]


def test_final_job_refuses_an_incomplete_search(tmp_path, glyph_root, monkeypatch):
    """The final job starts after every search job has ended (afterany), whatever their exit
    codes: it must itself refuse to run while the budget is not complete."""
    study_file = tiny_study(tmp_path, glyph_root, trials=2)
    journal = tmp_path / "study.journal"
    url = storage.normalize_storage(str(journal))
    secret = cluster.write_secret(tmp_path / "storage_url", url)
    spec = cluster.JobSpec(rest=("--study", str(study_file)), output=str(tmp_path / "run"),
                           storage_file=str(secret), gpus_per_job=0, workers_per_gpu=1)
    started = []
    monkeypatch.setattr("subprocess.call", lambda cmd, **kw: started.append(cmd) or 0)
    from harness.config import load_study

    study = open_study(load_study(str(study_file)), url)
    done = optuna.trial.create_trial(value=0.5, params={}, distributions={})
    study.add_trial(done)
    with pytest.raises(HarnessError, match="1 of 2 trials done, 0 running"):
        cluster.final_job(spec)
    study.add_trial(done)
    running = study.ask()  # a search job died holding it: not retried yet
    with pytest.raises(HarnessError, match="2 of 2 trials done, 1 running or waiting"):
        cluster.final_job(spec)
    assert started == []
    study.tell(running, state=TrialState.FAIL)
    assert cluster.final_job(spec)["started"] > 0
    assert len(started) == 1 and started[0][-2:] == ["--stage", "final"]


# --------------------------------------------------------------------------------------------
# Slurm: what is submitted (a fake sbatch records it)
# --------------------------------------------------------------------------------------------
FAKE_SBATCH = """#!/bin/sh
n=$(cat "{log}/count" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "{log}/count"
echo "$@" > "{log}/argv_$n"; cp "$1" "{log}/script_$n"
echo "Submitted batch job $((4241 + n))"
"""


def test_slurm_submits_an_array_then_a_dependent_final_job(tmp_path, glyph_root, monkeypatch,
                                                           capsys):
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(log=log))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(storage, "retrying", lambda what, url: what())
    # The storage is a PostgreSQL URL with a password; no server here: the study is not opened.
    monkeypatch.setattr("harness.search.open_study", lambda *a, **k: None)
    study_file = tiny_study(tmp_path, glyph_root, trials=3)
    out = tmp_path / "run"
    monkeypatch.setenv(workers.STORAGE_ENV, PG_URL)  # the launcher's own command line: no URL
    assert workers_main(["--launcher", "slurm", "--partition", "gpu", "--jobs", "3",
                         "--gpus-per-job", "2", "--workers-per-gpu", "4", "--time", "30",
                         "--slurm", "account=abc", "--study", str(study_file),
                         "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "jobs (4242_0, 4242_1, 4242_2)" in printed and "final: job 4243" in printed
    search, final = (log / "script_1").read_text(), (log / "script_2").read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --time=30",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --account=abc"):
        assert line in search, line
    assert "#SBATCH --dependency=afterany:4242_0:4242_1:4242_2" in final
    assert "#SBATCH --gpus-per-node=1" in final and "--array" not in final
    # The password: only in the launcher's 0600 file, nowhere else in the job folders.
    secret_file = out / "cluster" / cluster.SECRET_NAME
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret_file.read_text() == PG_URL
    files = [p for p in out.rglob("*") if p.is_file() and p != secret_file] + list(log.iterdir())
    assert any(p.suffix == ".pkl" for p in files)  # the pickled jobs are there ...
    for p in files:  # ... and hold the secret's path, not the secret
        assert SECRET.encode() not in p.read_bytes(), p
    assert SECRET not in printed
    spec = pickle.loads((out / "cluster" / "4243" / "4243_submitted.pkl").read_bytes()).args[0]
    assert spec.storage_file == str(secret_file) and spec.gpus_per_job == 2


# --------------------------------------------------------------------------------------------
# submitit's LocalExecutor: the cluster code path end to end, with a killed worker
# --------------------------------------------------------------------------------------------
def kill_one_worker_mid_trial(journal: Path, killed: dict, deadline_s: float = 240) -> None:
    """kill -9 the worker of the first RUNNING trial that has 1 to 3 folds done."""
    kill_worker_mid_trial(lambda: load_journal(journal), killed, deadline_s)


@pytest.mark.slow
def test_submitit_local_jobs_keep_the_budget_and_retry_a_killed_worker(tmp_path, glyph_root,
                                                                       monkeypatch, capsys):
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)
    budget = 2
    study_file = tiny_study(tmp_path, glyph_root, trials=budget, iters=10)
    out, journal = tmp_path / "run", tmp_path / "run" / "study.journal"
    out.mkdir()
    killed: dict = {}
    killer = threading.Thread(target=kill_one_worker_mid_trial, args=(journal, killed),
                              daemon=True)
    killer.start()
    code = workers_main(["--launcher", "submitit-local", "--jobs", "2", "--study",
                         str(study_file), "--output", str(out), "--storage", str(journal),
                         "--device", "cpu"])
    killer.join(timeout=5)
    printed = capsys.readouterr()
    assert killed, "no trial was caught mid-way"
    assert code == 0, printed.err[-3000:]
    assert "submitted search: 2 jobs" in printed.out and "submitted final" in printed.out
    assert "failed" in printed.err  # the job whose worker was killed
    study = load_journal(journal)
    counted = study.get_trials(deepcopy=False, states=storage.COUNTED)
    assert len(counted) == budget, [(t.number, t.state.name) for t in study.trials]
    seeds = [t.user_attrs["seed_number"] for t in counted]
    assert len(set(seeds)) == budget  # no trial counted twice
    trials = study.get_trials()
    assert trials[killed["number"]].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed["number"]]
    assert len(retry) == 1 and retry[0] in counted and retry[0].params == killed["params"]
    assert retry[0].user_attrs["pid"] != killed["pid"]
    for k, result in killed["done"].items():  # the killed worker's finished folds are kept
        assert retry[0].user_attrs["fold_results"][k] == result
    # The final stage: once, after every search job had ended.
    runs = json.loads((out / "provenance.json").read_text())
    finals = [r for r in runs if r["command"].endswith("--stage final")]
    assert len(finals) == 1 and (out / "final" / "summary.json").exists()
    job_dirs = [d for d in (out / "cluster").iterdir() if d.is_dir() and d.name != "%j"]
    assert len(job_dirs) == 3  # 2 search jobs, 1 final job
    results = {d.name: (pickle.loads(next(d.glob("*_result.pkl")).read_bytes()),
                        next(d.glob("*_result.pkl")).stat().st_mtime) for d in job_dirs}
    final = [v for v, _ in results.values() if v[0] == "success" and "workers" not in v[1]]
    assert len(final) == 1
    search_ended = max(mtime for v, mtime in results.values() if v is not final[0])
    assert final[0][1]["started"] >= search_ended


# --------------------------------------------------------------------------------------------
# harness.bench: workers per GPU
# --------------------------------------------------------------------------------------------
def test_recommended_workers_per_gpu():
    assert bench.recommend_workers_per_gpu({1: 1.0, 2: 1.05, 4: 1.02}) == 1  # < 10%: no gain
    assert bench.recommend_workers_per_gpu({1: 1.0, 2: 1.6, 4: 1.65, 8: 1.5}) == 2
    assert bench.recommend_workers_per_gpu({1: 1.0, 2: 1.3, 4: 1.8, 8: 1.85}) == 4


def test_bench_times_the_precision_the_harness_trains_in():
    """harness.bench's float32 rows are float32 on CUDA too (train.tf32 off), as training is:
    it used to time PyTorch's default, TF32 convolutions."""
    args = argparse.Namespace(trunk="small_cnn", crop=32, resize=36, workers=0, batch=16,
                              iters=1, warmup=1)
    cfg = bench.bench_config(torch.device("cpu"), args)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = True
        assert bench.ceiling_images_per_s(cfg, torch.device("cpu"), 1, 1, 20, amp=False,
                                          channels_last=False) > 0
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


@pytest.mark.slow
def test_bench_times_k_concurrent_workers(capsys):
    """The mechanism on CPU: K worker processes train at once, their img/s are summed."""
    args = argparse.Namespace(crop=32, resize=36, workers=0, batch=16, iters=2, warmup=2,
                              concurrency=[2], concurrency_trunks=["small_cnn"],
                              concurrency_s=1.0)
    record: dict = {}
    rows = bench.workers_per_gpu_rows(args, torch.device("cpu"), 20, record)
    result = record["workers_per_gpu"]["small_cnn"]
    assert set(result["images_per_s"]) == {"1", "2"}  # K = 1 is always the reference
    assert all(v > 0 for v in result["images_per_s"].values())
    assert result["ratio"]["1"] == 1.0 and result["recommended"] in (1, 2)
    assert rows[-1][0] == "small_cnn: recommended --workers-per-gpu"
