"""Run one study's search with several worker processes, then its final stage once.

    python -m harness.workers --study proxy_anchor_cub --workers 4 --gpus 0,1,2,3 \\
        --data-root /data/CUB_200_2011
    python -m harness.workers --study quickstart --workers 2          # CPU, one SQLite file

The launcher creates the output folder and the Optuna study once (so workers never race on a
fresh database), prepares the data once (so caches are written once), starts N
`python -m harness.run --stage search` workers on the same storage, each with
CUDA_VISIBLE_DEVICES set to one GPU of --gpus (round-robin), and waits. Any flag it does not
know is passed to harness.run. If a worker fails, the others finish the trial budget (a dead
worker's trial is retried), the launcher says which worker failed and exits 1; re-running the
same command resumes. Otherwise, unless --stage search, it runs the final stage once (on the
first GPU). Worker output goes to OUTPUT/workers/worker_K.log.

On several machines: run the launcher on each with the same --storage (a PostgreSQL URL) and
--stage search, then `python -m harness.run ... --stage final` once (README, "Many workers").
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


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m harness.workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, required=True, help="worker processes on this machine")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids, e.g. 0,1,2,3: worker K "
                                              "sees only GPU K mod len (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--stage", choices=("all", "search"), default="all",
                   help="search only (e.g. on all but one machine), or search then final")
    args, rest = p.parse_known_args(argv)
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    args.gpu_list = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if "--stage" in rest or any(a.startswith("--stage=") for a in rest):
        raise ConfigError("--stage given twice")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    try:
        args, rest = parse_args(argv)
        return launch(args, rest)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are saved; re-run the same command to resume",
              file=sys.stderr)
        return 130


def prepare(rest: list[str]) -> tuple[Path, str]:
    """Resolve the study like harness.run does, create the output folder, the study and the data
    caches once. Returns (output folder, storage URL)."""
    from harness import run
    from harness.search import open_study
    from harness.storage import default_storage

    run_args = run.parse_args(rest)
    if not run_args.study:
        raise ConfigError("--study NAME is required (python -m harness.run --list shows them)")
    cfg = run.resolve_config(run_args)
    output = run.output_dir(run_args, cfg).resolve()
    run.check_same_study(output, cfg)
    output.mkdir(parents=True, exist_ok=True)
    storage = run_args.storage or default_storage(output)
    from harness.data import dataset_defaults, prepare_data
    from harness.provenance import write_json

    with run.output_lock(output):
        write_json(output / "config.json", cfg.to_dict())
    data = prepare_data(cfg)  # renders / caches images once, before N workers read them
    open_study(cfg, storage, dataset_defaults(cfg, data.spec)[0])
    return output, storage


def launch(args: argparse.Namespace, rest: list[str]) -> int:
    if args.gpu_list and any(a.startswith("cuda:") for a in rest):
        raise ConfigError("with --gpus each worker sees only its own GPU: use --device cuda "
                          "(or leave --device out), not cuda:N")
    output, storage = prepare(rest)
    # Workers get the resolved output and storage so that all of them use the same ones.
    common = [sys.executable, "-m", "harness.run", *rest, "--output", str(output),
              "--storage", storage]
    logs = output / "workers"
    logs.mkdir(exist_ok=True)
    procs = []
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    for k in range(args.workers):
        env = dict(os.environ)
        gpu = args.gpu_list[k % len(args.gpu_list)] if args.gpu_list else None
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        env.setdefault("HARNESS_NO_PROGRESS", "1")  # no progress bars in log files
        # N workers each running one thread per core would oversubscribe the CPU (OpenMP
        # threads spin-wait): split the cores between the workers unless the user chose.
        env.setdefault("OMP_NUM_THREADS", str(threads))
        log = open(logs / f"worker_{k}.log", "a")
        proc = subprocess.Popen(common + ["--stage", "search"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        print(f"worker {k}: pid {proc.pid}" + (f", GPU {gpu}" if gpu is not None else "") +
              f", log {logs / f'worker_{k}.log'}", flush=True)
    try:
        codes = wait_all(procs)
    except KeyboardInterrupt:
        for proc in procs:
            proc.wait()
        raise
    failed = [k for k, code in enumerate(codes) if code != 0]
    if failed:
        for k in failed:
            tail = (logs / f"worker_{k}.log").read_text(errors="replace").splitlines()[-15:]
            print(f"error: worker {k} (pid {procs[k].pid}) exited with code {codes[k]}; "
                  f"the end of its log:\n  " + "\n  ".join(tail), file=sys.stderr)
        print(f"error: {len(failed)} of {len(procs)} workers failed; the others finished what "
              f"they could. Re-run the same command to resume (their unfinished trials are "
              f"retried).", file=sys.stderr)
        return 1
    print(f"search done: {args.workers} workers, storage {storage}", flush=True)
    if args.stage == "search":
        return 0
    env = dict(os.environ)
    if args.gpu_list:
        env["CUDA_VISIBLE_DEVICES"] = args.gpu_list[0]
    return subprocess.call(common + ["--stage", "final"], env=env)


def wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every worker; report each failure as it happens (the others keep going)."""
    codes: list[int | None] = [None] * len(procs)
    while any(c is None for c in codes):
        for k, proc in enumerate(procs):
            if codes[k] is None and proc.poll() is not None:
                codes[k] = proc.returncode
                if proc.returncode != 0:
                    print(f"worker {k} (pid {proc.pid}) failed with exit code "
                          f"{proc.returncode}; the other workers go on", file=sys.stderr,
                          flush=True)
        time.sleep(POLL_SECONDS)
    return [int(c) for c in codes]


if __name__ == "__main__":
    sys.exit(main())
