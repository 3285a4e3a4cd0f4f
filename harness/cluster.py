"""Run a study's search as scheduler jobs (submitit): a job array of workers, then the final.

    python -m harness.workers --launcher slurm --partition gpu --jobs 16 --gpus-per-job 1 \\
        --workers-per-gpu 2 --time 720 --study proxy_anchor_cub --data-root /data/CUB \\
        --storage /shared/runs/cub/study.journal --output /shared/runs/cub

The launcher (harness.workers) prepares the study and the data once, then submits
  * the search: a job array of --jobs jobs; each job starts gpus x --workers-per-gpu search
    workers (the local launcher's code, on the GPUs the scheduler gave the job) and waits;
  * the final stage: one job that starts after every search job has ended (slurm
    `afterany`), and refuses to run unless the search budget is complete (`check_search_done`).
    `afterany` rather than `afterok`: a search job killed mid-trial (preempted, node failure,
    time limit) has had its trial retried by the other jobs, and the budget check, not the exit
    codes, says whether the search is done.
With --launcher submitit-local the jobs are submitit LocalExecutor processes on this machine
(the same job functions; tests use it). LocalExecutor has no dependencies, so the launcher waits
for the search jobs and then submits the final job itself.

Secrets: the jobs never see the storage URL in a pickle or a command line. The launcher writes
it to OUTPUT/cluster/storage_url (mode 0600); the pickled job (OUTPUT/cluster/<job id>/) holds
its path only, and each job passes the URL to its workers in $HARNESS_STORAGE.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ConfigError, HarnessError
from harness.workers import (STORAGE_ENV, report_failures, start_workers, wait_all,
                             worker_command, worker_env)

SECRET_NAME = "storage_url"
LOCAL_TIME_MIN = 7 * 24 * 60  # submitit's LocalExecutor kills a job after 2 minutes by default


@dataclass(frozen=True)
class JobSpec:
    """What a job needs; pickled by submitit into its job folder, so no secrets here."""
    rest: tuple[str, ...]  # harness.run flags (without --storage)
    output: str
    storage_file: str  # the 0600 file holding the storage URL
    gpus_per_job: int
    workers_per_gpu: int


# --------------------------------------------------------------------------------------------
# Inside a job
# --------------------------------------------------------------------------------------------
def job_gpus(spec: JobSpec) -> list[str]:
    """The GPUs the scheduler gave this job (slurm sets CUDA_VISIBLE_DEVICES)."""
    if spec.gpus_per_job == 0:
        return []
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return visible[:spec.gpus_per_job] or [str(k) for k in range(spec.gpus_per_job)]


def _job_id() -> str:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # called outside a submitit job (tests)
        return str(os.getpid())


def _die_with_parent() -> None:
    """In a worker, before exec: die when the job process dies. Slurm kills a job's processes
    itself; submitit's LocalExecutor kills only the job process, which would leave its workers
    running outside the scheduler's view."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def search_job(spec: JobSpec) -> dict:
    """One worker job: gpus x K search workers on the job's GPUs; waits for them. Raises (the
    job fails) when a worker failed; the others have finished what they could."""
    started = time.time()
    storage = read_secret(Path(spec.storage_file))
    gpus = job_gpus(spec)
    n = max(1, len(gpus)) * spec.workers_per_gpu
    logs = Path(spec.output) / "workers"
    prefix = f"job_{_job_id()}_worker"
    procs = start_workers(list(spec.rest), Path(spec.output), storage, gpus, n, logs, prefix,
                          preexec_fn=_die_with_parent)
    _forward_termination(procs)
    codes = wait_all(procs, prefix)
    failed = report_failures(procs, codes, logs, prefix)
    if failed:
        raise HarnessError(f"{len(failed)} of {n} workers of this job failed (logs "
                           f"{logs}/{prefix}_*.log); the other jobs retry their trials")
    return {"started": started, "ended": time.time(), "workers": n, "gpus": gpus}


def _forward_termination(procs) -> None:
    """SIGTERM/SIGINT to the job (scancel, time limit, LocalJob.cancel) reach its workers."""
    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)


def check_search_done(rest: list[str], storage: str) -> tuple[int, int]:
    """(counted trials, budget); raises unless the search budget is complete and no trial is
    still running or waiting to be retried."""
    from optuna.trial import TrialState

    from harness import run
    from harness.search import open_study
    from harness.storage import counted_trials

    cfg = run.resolve_config(run.parse_args(rest))
    study = open_study(cfg, storage)
    counted = counted_trials(study)
    pending = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    if counted < cfg.search.trials or pending:
        raise HarnessError(
            f"the search is not complete: {counted} of {cfg.search.trials} trials done, "
            f"{len(pending)} running or waiting (a search job died before finishing them). The "
            f"final stage did not run; submit the same command again to finish the search.")
    return counted, cfg.search.trials


def final_job(spec: JobSpec) -> dict:
    """The final stage, once, after every search job: only when the search budget is done."""
    started = time.time()
    storage = read_secret(Path(spec.storage_file))
    counted, budget = check_search_done(list(spec.rest), storage)
    print(f"search complete ({counted} of {budget} trials): running the final stage",
          flush=True)
    gpus = job_gpus(spec)
    env = worker_env(storage, gpus[0] if gpus else None)
    import subprocess

    code = subprocess.call(worker_command(list(spec.rest), Path(spec.output), "final"),
                           env=env, preexec_fn=_die_with_parent)
    if code != 0:
        raise HarnessError(f"the final stage exited with code {code}")
    return {"started": started, "ended": time.time()}


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------
def write_secret(path: Path, text: str) -> Path:
    """Write text readable by this user only (0600), also when the file already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


def read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as e:
        raise HarnessError(f"cannot read the storage URL file {path}: {e} (the job folder "
                           f"must be on a file system the jobs share with the launcher)") from None


# --------------------------------------------------------------------------------------------
# The launcher's side
# --------------------------------------------------------------------------------------------
def make_executor(args: argparse.Namespace, folder: Path, name: str, gpus: int,
                  dependency: str | None = None):
    import submitit

    root = str(Path(__file__).resolve().parent.parent)
    # Jobs import the launcher's copy of the harness (they unpickle harness.cluster functions).
    setup = [f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if args.launcher == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        params = dict(job_name=name, time=args.time, gpus_per_node=gpus or None,
                      partition=args.partition, setup=setup, array_parallelism=args.jobs,
                      cpus_per_task=args.cpus_per_job, mem=f"{args.mem_gb}GB" if args.mem_gb
                      else None, dependency=dependency,
                      additional_parameters=dict(kv.split("=", 1) for kv in args.slurm) or None)
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=args.time or LOCAL_TIME_MIN, gpus_per_node=gpus,
                                   setup=setup)
    return executor


def submit(args: argparse.Namespace, rest: list[str], output: Path, storage: str) -> int:
    """Submit the search jobs and the final job; print their ids and log folders. slurm: returns
    at once. submitit-local: waits for the jobs (they are this machine's processes)."""
    from harness.workers import without_storage

    if args.gpus_per_job and any(a.startswith("cuda:") for a in rest):
        raise ConfigError("each job's workers see only their own GPU: use --device cuda (or "
                          "leave --device out), not cuda:N")
    base = output / "cluster"
    secret = write_secret(base / SECRET_NAME, storage)
    spec = JobSpec(rest=tuple(without_storage(rest)), output=str(output),
                   storage_file=str(secret), gpus_per_job=args.gpus_per_job,
                   workers_per_gpu=args.workers_per_gpu)
    folder = base / "%j"  # one folder per job: its pickle, its stdout/stderr
    try:
        executor = make_executor(args, folder, "harness-search", args.gpus_per_job)
        with executor.batch():  # one job array on slurm
            jobs = [executor.submit(search_job, spec) for _ in range(args.jobs)]
    except (RuntimeError, OSError, ValueError) as e:  # no sbatch/srun, sbatch refused
        raise ConfigError(f"--launcher {args.launcher}: submitting failed: {e}") from None
    per_job = max(1, args.gpus_per_job) * args.workers_per_gpu
    print(f"submitted search: {len(jobs)} jobs ({', '.join(j.job_id for j in jobs)}), "
          f"{args.gpus_per_job} GPU(s) and {per_job} workers each; logs {base}/<job id>/ and "
          f"{output / 'workers'}/job_<job id>_worker_K.log", flush=True)
    if args.stage == "search":
        return 0 if args.launcher == "slurm" or not _wait_search(jobs) else 1
    final_gpus = 1 if args.gpus_per_job else 0
    if args.launcher == "slurm":
        after = "afterany:" + ":".join(j.job_id for j in jobs)
        final = make_executor(args, folder, "harness-final", final_gpus, after).submit(
            final_job, spec)
        print(f"submitted final: job {final.job_id}, after all search jobs ({after}); it runs "
              f"only if the search budget is complete; log {base}/{final.job_id}/", flush=True)
        return 0
    failed = _wait_search(jobs)  # LocalExecutor has no dependencies: wait, then submit
    final = make_executor(args, folder, "harness-final", final_gpus).submit(final_job, spec)
    print(f"submitted final: job {final.job_id}, after all search jobs ended; log "
          f"{base}/{final.job_id}/", flush=True)
    try:
        final.result()
    except Exception as e:  # noqa: BLE001 (submitit wraps the job's exception and log tail)
        print(f"error: the final job {final.job_id} failed: {_last_line(e)}; its log: "
              f"{final.paths.stderr}", file=sys.stderr)
        return 1
    # A failed search job is no error here: the final job found the budget complete, so the
    # other jobs retried its trials.
    print(f"final stage done ({failed} search job(s) had failed, their trials retried)"
          if failed else "final stage done", flush=True)
    return 0


def _wait_search(jobs) -> int:
    """Wait for the local search jobs; name the failed ones. Returns how many failed."""
    failed = 0
    for job in jobs:
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 (submitit's FailedJobError / UncompletedJobError)
            failed += 1
            print(f"search job {job.job_id} failed: {_last_line(e)}; log {job.paths.stderr}",
                  file=sys.stderr, flush=True)
    return failed


def _last_line(e: BaseException) -> str:
    """The job's own error from submitit's message (a traceback, then log paths)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if "Error: " in line or "Exception: " in line]
    return (errors or lines or [type(e).__name__])[-1]


__all__ = ["JobSpec", "search_job", "final_job", "check_search_done", "submit", "write_secret",
           "read_secret", "STORAGE_ENV"]
