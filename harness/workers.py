"""Run one study's search with several worker processes, then its final stage once.

    python -m harness.workers --study proxy_anchor_cub --workers 4 --gpus 0,1,2,3 \\
        --data-root /data/CUB_200_2011
    python -m harness.workers --study proxy_anchor_cub --gpus 0,1 --workers-per-gpu 2 ...
    python -m harness.workers --study quickstart --workers 2          # CPU, one SQLite file
    python -m harness.workers --launcher slurm --partition gpu --jobs 16 --gpus-per-job 1 \\
        --workers-per-gpu 2 --time 720 --study ... --storage /shared/run/study.journal

The launcher creates the output folder and the Optuna study once (so workers never race on a
fresh database), prepares the data once (so caches are written once), starts N
`python -m harness.run --stage search` workers on the same storage, each with
CUDA_VISIBLE_DEVICES set to one GPU of --gpus (round-robin; --workers-per-gpu K puts K workers
on each GPU), and waits. Any flag it does not know is passed to harness.run. If a worker fails,
the others finish the trial budget (a dead worker's trial is retried), the launcher says which
worker failed and exits 1; re-running the same command resumes. Otherwise, unless --stage
search, it runs the final stage once (on the first GPU). Worker output goes to
OUTPUT/workers/worker_K.log.

--launcher slurm (or submitit-local: the same jobs as local processes, for tests) submits the
search as a job array instead and the final stage as one job after it (harness/cluster.py,
docs/cluster.md). Workers get the storage URL in $HARNESS_STORAGE, never on their command line
(a password in it would show in `ps`); the launcher itself reads $HARNESS_STORAGE when --storage
is not given.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from harness.errors import ConfigError, HarnessError

POLL_SECONDS = 1.0
STORAGE_ENV = "HARNESS_STORAGE"  # the storage URL of a worker (not on its command line: `ps`)
WORKER_FLAG = "--worker"  # `python -m harness.workers --worker ARGS`: harness.run ARGS + storage
LAUNCHERS = ("local", "slurm", "submitit-local")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m harness.workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: processes on this machine (default); slurm: a job array of "
                        "worker jobs and a final job (submitit); submitit-local: the same jobs "
                        "run as local processes (tests)")
    p.add_argument("--workers", type=int, help="local: worker processes on this machine "
                                               "(default: GPUs x --workers-per-gpu)")
    p.add_argument("--gpus", default="", help="local: comma-separated GPU ids, e.g. 0,1,2,3: "
                                              "worker K sees only GPU K mod len "
                                              "(CUDA_VISIBLE_DEVICES)")
    p.add_argument("--workers-per-gpu", type=int, default=None, metavar="K",
                   help="K workers share each GPU (default 1); in a CPU-only job: K workers")
    p.add_argument("--stage", choices=("all", "search"), default="all",
                   help="search only (e.g. on all but one machine), or search then final")
    cluster = p.add_argument_group("cluster launchers (slurm, submitit-local)")
    cluster.add_argument("--jobs", type=int, default=1, help="worker jobs (a job array)")
    cluster.add_argument("--gpus-per-job", type=int, default=None,
                         help="GPUs of each worker job (default: slurm 1, submitit-local 0)")
    cluster.add_argument("--partition", help="slurm partition")
    cluster.add_argument("--time", type=int, help="time limit of each job in minutes "
                                                  "(required with slurm)")
    cluster.add_argument("--cpus-per-job", type=int, help="CPU cores of each worker job")
    cluster.add_argument("--mem-gb", type=int, help="memory of each job in GB")
    cluster.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                         help="any other sbatch option, e.g. --slurm account=abc --slurm "
                              "qos=high --slurm constraint=a100 (repeatable)")
    args, rest = p.parse_known_args(argv)
    if "--stage" in rest or any(a.startswith("--stage=") for a in rest):
        raise ConfigError("--stage given twice")
    args.gpu_list = parse_gpus(args.gpus)
    per_gpu = args.workers_per_gpu
    if per_gpu is not None and per_gpu < 1:
        raise ConfigError("--workers-per-gpu must be at least 1")
    args.workers_per_gpu = per_gpu or 1
    if args.launcher == "local":
        check_local(args, per_gpu is not None)
    else:
        check_cluster(args)
    return args, rest


def parse_gpus(text: str) -> list[str]:
    """--gpus 0,1,2: CUDA device indices (integers), each once."""
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    for g in gpus:
        if not g.isdigit():
            raise ConfigError(f"--gpus {text!r}: {g!r} is not a GPU index; give comma-separated "
                              f"integers as nvidia-smi lists them, e.g. --gpus 0,1,2,3")
    if len(set(int(g) for g in gpus)) != len(gpus):
        raise ConfigError(f"--gpus {text!r}: a GPU is listed twice; to run several workers on "
                          f"one GPU use --workers-per-gpu K")
    return [str(int(g)) for g in gpus]


def check_local(args: argparse.Namespace, per_gpu_given: bool) -> None:
    if per_gpu_given and not args.gpu_list:
        raise ConfigError("--workers-per-gpu needs --gpus (on CPU give --workers N)")
    default = len(args.gpu_list) * args.workers_per_gpu if args.gpu_list else None
    if args.workers is None:
        if default is None:
            raise ConfigError("give --workers N (or --gpus with --workers-per-gpu)")
        args.workers = default
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if per_gpu_given and args.workers != default:
        raise ConfigError(f"--workers {args.workers} contradicts --gpus x --workers-per-gpu = "
                          f"{default}: give one of them")


def check_cluster(args: argparse.Namespace) -> None:
    if args.workers is not None or args.gpu_list:
        raise ConfigError(f"--launcher {args.launcher}: the scheduler picks the GPUs; give "
                          f"--jobs, --gpus-per-job and --workers-per-gpu, not --workers/--gpus")
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    if args.gpus_per_job is None:
        args.gpus_per_job = 1 if args.launcher == "slurm" else 0
    if args.gpus_per_job < 0:
        raise ConfigError("--gpus-per-job must be 0 (CPU) or more")
    if args.launcher == "slurm" and args.time is None:
        raise ConfigError("--launcher slurm needs --time MINUTES (the job time limit; "
                          "submitit's default is 5 minutes)")
    if args.time is not None and args.time < 1:
        raise ConfigError("--time must be at least 1 minute")
    for item in args.slurm:
        if "=" not in item:
            raise ConfigError(f"--slurm {item!r}: expected KEY=VALUE, e.g. --slurm account=abc")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == [WORKER_FLAG]:
            return run_worker(argv[1:])
        args, rest = parse_args(argv)
        if args.launcher != "local":
            from harness.cluster import submit

            output, storage = prepare(rest)
            return submit(args, rest, output, storage)
        return launch(args, rest)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are saved; re-run the same command to resume",
              file=sys.stderr)
        return 130


def run_worker(argv: list[str]) -> int:
    """A worker: harness.run with the storage URL from $HARNESS_STORAGE, so that the URL (and a
    password in it) is in no process's command line."""
    storage = os.environ.pop(STORAGE_ENV, "")
    if not storage:
        raise ConfigError(f"{WORKER_FLAG}: ${STORAGE_ENV} is not set (workers are started by "
                          f"python -m harness.workers, which sets it)")
    from harness import run

    return run.main(argv + ["--storage", storage])


def prepare(rest: list[str]) -> tuple[Path, str]:
    """Resolve the study like harness.run does, create the output folder, the study and the data
    caches once. Returns (output folder, storage URL: --storage, else $HARNESS_STORAGE, else
    SQLite in the output folder)."""
    from harness import run
    from harness.search import open_study
    from harness.storage import default_storage, normalize_storage

    run_args = run.parse_args(rest)
    if not run_args.study:
        raise ConfigError("--study NAME is required (python -m harness.run --list shows them)")
    cfg = run.resolve_config(run_args)
    output = run.output_dir(run_args, cfg).resolve()
    run.check_same_study(output, cfg)
    output.mkdir(parents=True, exist_ok=True)
    storage = normalize_storage(run_args.storage or os.environ.get(STORAGE_ENV) or
                                default_storage(output))
    from harness.data import dataset_defaults
    from harness.run_folder import write_json_atomic

    # harness.run's checks, before this writes config.json or creates the study; it also
    # builds the glyph trunk and renders / caches images once, before N workers read them
    data, _ = run.checked_inputs(cfg, output, run._trunk_weights(cfg))
    with run.output_lock(output):
        write_json_atomic(output / "config.json", cfg.to_dict())
    open_study(cfg, storage, dataset_defaults(cfg, data.spec)[0])
    return output, storage


def without_storage(rest: list[str]) -> list[str]:
    """harness.run flags minus --storage (workers get the URL in $HARNESS_STORAGE)."""
    out, skip = [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg == "--storage":
            skip = True
        elif not arg.startswith("--storage="):
            out.append(arg)
    return out


def worker_command(rest: list[str], output: Path, stage: str) -> list[str]:
    """The command line of a worker: no storage URL on it (`ps` shows command lines)."""
    return [sys.executable, "-m", "harness.workers", WORKER_FLAG, *without_storage(rest),
            "--output", str(output), "--stage", stage]


def worker_env(storage: str, gpu: str | None, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env[STORAGE_ENV] = storage
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env.setdefault("HARNESS_NO_PROGRESS", "1")  # no progress bars in log files
    if threads is not None:
        # N workers each running one thread per core would oversubscribe the CPU (OpenMP
        # threads spin-wait): split the cores between the workers unless the user chose.
        env.setdefault("OMP_NUM_THREADS", str(threads))
    # Workers run the launcher's copy of the harness, whatever their working directory.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p and p != root])
    return env


def start_workers(rest: list[str], output: Path, storage: str, gpus: list[str], n: int,
                  logs: Path, prefix: str = "worker", preexec_fn=None) -> list[subprocess.Popen]:
    """Start n search workers; worker k sees GPU gpus[k mod len] (none: CPU, cores split)."""
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, cpu_count() // n)
    procs = []
    for k in range(n):
        gpu = gpus[k % len(gpus)] if gpus else None
        log_path = logs / f"{prefix}_{k}.log"
        with open(log_path, "a") as log:
            proc = subprocess.Popen(worker_command(rest, output, "search"),
                                    env=worker_env(storage, gpu, threads), stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        procs.append(proc)
        print(f"{prefix} {k}: pid {proc.pid}" + (f", GPU {gpu}" if gpu is not None else "") +
              f", log {log_path}", flush=True)
    return procs


def cpu_count() -> int:
    """Cores this process may use (a cluster job's allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def report_failures(procs: list[subprocess.Popen], codes: list[int], logs: Path,
                    prefix: str = "worker") -> list[int]:
    """Name each failed worker and show the end of its log; returns their indices."""
    failed = [k for k, code in enumerate(codes) if code != 0]
    for k in failed:
        tail = (logs / f"{prefix}_{k}.log").read_text(errors="replace").splitlines()[-15:]
        print(f"error: {prefix} {k} (pid {procs[k].pid}) exited with code {codes[k]}; "
              f"the end of its log:\n  " + "\n  ".join(tail), file=sys.stderr)
    return failed


def launch(args: argparse.Namespace, rest: list[str]) -> int:
    if args.gpu_list and any(a.startswith("cuda:") for a in rest):
        raise ConfigError("with --gpus each worker sees only its own GPU: use --device cuda "
                          "(or leave --device out), not cuda:N")
    from harness.storage import redact_url

    output, storage = prepare(rest)
    logs = output / "workers"
    procs = start_workers(rest, output, storage, args.gpu_list, args.workers, logs)
    try:
        codes = wait_all(procs)
    except KeyboardInterrupt:
        for proc in procs:
            proc.wait()
        raise
    failed = report_failures(procs, codes, logs)
    if failed:
        print(f"error: {len(failed)} of {len(procs)} workers failed; the others finished what "
              f"they could. Re-run the same command to resume (their unfinished trials are "
              f"retried).", file=sys.stderr)
        return 1
    print(f"search done: {args.workers} workers, storage {redact_url(storage)}", flush=True)
    if args.stage == "search":
        return 0
    gpu = args.gpu_list[0] if args.gpu_list else None
    return subprocess.call(worker_command(rest, output, "final"), env=worker_env(storage, gpu))


def wait_all(procs: list[subprocess.Popen], prefix: str = "worker") -> list[int]:
    """Wait for every worker; report each failure as it happens (the others keep going)."""
    codes: list[int | None] = [None] * len(procs)
    while any(c is None for c in codes):
        for k, proc in enumerate(procs):
            if codes[k] is None and proc.poll() is not None:
                codes[k] = proc.returncode
                if proc.returncode != 0:
                    print(f"{prefix} {k} (pid {proc.pid}) failed with exit code "
                          f"{proc.returncode}; the other workers go on", file=sys.stderr,
                          flush=True)
        time.sleep(POLL_SECONDS)
    return [int(c) for c in codes]


if __name__ == "__main__":
    sys.exit(main())
