"""Several workers on one study: race-free creation, exact budget, kill -9, PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from harness.config import load_study
from harness.data import prepare_data
from harness.search import fold_steps, make_pruner, open_study, prune_within_folds
from harness.storage import COUNTED, sqlite_path
from harness.workers import main as workers_main
from conftest import REPO, kill_worker_mid_trial, load, write_study

# Workers inherit these: quiet logs and a fast heartbeat so that a dead worker's trial is
# declared stale within seconds (defaults: 30 s heartbeat, 120 s grace).
FAST_ENV = {"HARNESS_NO_PROGRESS": "1", "HARNESS_HEARTBEAT_S": "1", "HARNESS_GRACE_S": "3"}


@pytest.fixture
def fast_env(monkeypatch):
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)


def tiny_study(tmp_path: Path, glyph_root: Path, trials: int, iters: int = 3) -> Path:
    path = write_study(tmp_path, glyph_root, iters=iters)
    path.write_text(path.read_text().replace("trials = 2", f"trials = {trials}"))
    return path


def check_budget(study: optuna.Study, budget: int) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE + PRUNED == budget, and no trial (seed number) counted twice."""
    counted = study.get_trials(deepcopy=False, states=COUNTED)
    assert len(counted) == budget, [(t.number, t.state.name) for t in study.trials]
    seeds = [t.user_attrs["seed_number"] for t in counted]
    assert len(set(seeds)) == len(seeds), seeds
    return counted


def concurrent_open(url: str, n: int = 8) -> list[str]:
    """n threads open the same study on a fresh database at the same moment."""
    cfg = load_study("quickstart")
    barrier = threading.Barrier(n)
    results: list[str] = []

    def go():
        barrier.wait()
        try:
            open_study(cfg, url)
            results.append("ok")
        except Exception as e:  # noqa: BLE001 (the test reports it)
            results.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_creation_on_a_fresh_sqlite_file(tmp_path):
    # Plain RDBStorage fails here for all but one opener ("table studies already exists").
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert concurrent_open(url) == ["ok"] * 8
    assert len(optuna.get_all_study_summaries(url)) == 1


def test_pruner_steps_are_training_iterations():
    cfg = load_study("quickstart", overrides=["train.max_epochs=12", "train.iters_per_epoch=40"])
    assert fold_steps(cfg) == 480 and not prune_within_folds(cfg)  # MLRC: no pruning
    cfg.search.pruner = "median"  # the opt-in
    median = make_pruner(cfg)
    assert median._n_warmup_steps == 480  # prunes from the end of the first fold
    cfg.search.pruner = "hyperband"
    hyperband = make_pruner(cfg, val_every_epochs=2)
    assert (hyperband._min_resource, hyperband._max_resource) == (480, 4 * 480)
    cfg.search.prune_warmup_folds = 0  # inside the first fold: from the first validation
    assert prune_within_folds(cfg) and make_pruner(cfg, val_every_epochs=2)._min_resource == 80
    cfg.search.pruner = "median"
    assert make_pruner(cfg)._n_warmup_steps == 0
    assert sqlite_path("sqlite:////tmp/x/study.db") == Path("/tmp/x/study.db")
    assert sqlite_path("postgresql+psycopg://u@h/db") is None


def test_launcher_rejects_cuda_n_with_gpus(capsys):
    assert workers_main(["--study", "quickstart", "--workers", "2", "--gpus", "0,1",
                         "--device", "cuda:1"]) == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path, glyph_root, fast_env):
    budget = 5
    study_file = tiny_study(tmp_path, glyph_root, trials=budget)
    out = tmp_path / "run"
    assert workers_main(["--study", str(study_file), "--workers", "2", "--output", str(out),
                         "--device", "cpu"]) == 0
    counted = check_budget(load(out), budget)
    assert all(t.state == TrialState.COMPLETE for t in counted)  # pruner "none"
    workers = {(t.user_attrs["host"], t.user_attrs["pid"]) for t in counted}
    assert len(workers) == 2, workers  # both workers did work
    assert {h for h, _ in workers} == {socket.gethostname()}
    assert (out / "final" / "summary.json").exists()  # the final stage ran once, after
    assert (out / "workers" / "worker_1.log").exists()


@pytest.mark.slow
def test_kill_minus_9_of_one_worker(tmp_path, glyph_root, fast_env, capsys):
    budget = 2
    study_file = tiny_study(tmp_path, glyph_root, trials=budget, iters=15)
    out = tmp_path / "run"
    killed: dict = {}

    def killer():  # kill -9 the worker of the first trial that has 1 to 3 folds done
        kill_worker_mid_trial(lambda: load(out), killed, deadline_s=120, poll_s=0.1,
                              ready=(out / "workers").exists)  # the launcher made the study

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    code = workers_main(["--study", str(study_file), "--workers", "2", "--output", str(out),
                         "--device", "cpu", "--stage", "search"])
    thread.join(timeout=5)
    assert killed, "no trial was caught mid-way"
    assert code == 1  # the launcher says a worker failed ...
    assert "exited with code -9" in capsys.readouterr().err
    study = load(out)
    counted = check_budget(study, budget)  # ... but the other worker finished the budget
    trials = study.get_trials()
    assert trials[killed["number"]].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed["number"]]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == killed["params"] and retry[0] in counted
    assert retry[0].user_attrs["pid"] != killed["pid"]
    for k, result in killed["done"].items():  # the killed worker's finished folds are kept
        assert retry[0].user_attrs["fold_results"][k] == result


# --------------------------------------------------------------------------------------------
# PostgreSQL: a throwaway server, when the binaries and psycopg are there
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url(request):
    """postgresql+psycopg:// URL of a fresh server in a temporary folder (stopped afterwards)."""
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[dev]')")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not on PATH")
    prefix: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as 'nobody'
        runuser = shutil.which("runuser")
        if not runuser:
            shutil.rmtree(folder)
            pytest.skip("running as root and no runuser to start PostgreSQL as 'nobody'")
        prefix = [runuser, "-u", "nobody", "--"]
        shutil.chown(folder, "nobody")
    port = _free_port()
    data = folder / "data"
    run = lambda *cmd: subprocess.run(prefix + list(cmd), capture_output=True, text=True,  # noqa: E731
                                      timeout=120)
    made = run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres")
    if made.returncode != 0:
        shutil.rmtree(folder)
        pytest.skip(f"initdb failed: {made.stderr[-500:]}")
    started = run(pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                  f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop():
        run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)

    request.addfinalizer(stop)
    if started.returncode != 0:
        pytest.skip(f"pg_ctl start failed: {started.stderr[-500:]}")
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


def _create_database(server_url: str, name: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.mark.slow
def test_two_workers_on_postgresql(tmp_path, glyph_root, fast_env, postgres_url):
    # Fresh database, many openers at once: all but one lose the table-creation race and retry.
    assert concurrent_open(_create_database(postgres_url, "race")) == ["ok"] * 8

    budget = 4
    url = _create_database(postgres_url, "study")
    study_file = tiny_study(tmp_path, glyph_root, trials=budget)
    prepare_data(load_study(str(study_file)))  # render the glyphs once, before two readers
    # Two machines' worth of workers, each with its own output folder (per-machine trials/),
    # started without the launcher on a fresh database: each creates or loads the study.
    procs = [subprocess.Popen([sys.executable, "-m", "harness.run", "--study", str(study_file),
                               "--output", str(tmp_path / f"machine_{k}"), "--device", "cpu",
                               "--stage", "search", "--storage", url],
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output[-2000:]
    study = optuna.load_study(study_name="tiny", storage=url)
    counted = check_budget(study, budget)
    assert len({t.user_attrs["pid"] for t in counted}) == 2  # both workers did work
    for t in counted:  # each trial's folders are on the machine that ran it
        machines = [k for k in range(2) if (tmp_path / f"machine_{k}" / "trials" /
                                            f"trial_{t.number:04d}").exists()]
        assert len(machines) == 1
