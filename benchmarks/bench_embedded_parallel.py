"""Two ways to use the cores for embedded runs: intra-op threads or parallel processes.

    python benchmarks/bench_embedded_parallel.py [--folds 4] [--iters 200]

Trains `--folds` fold models of the embedded profile (proxy_anchor_glyphs, the pretrained glyph
trunk, `--iters` iterations each, validation as the profile does) three ways, on the same
machine in one run, and prints fold trainings per minute and the ratios:
  * threads:   one process, torch threads = the cores, the folds one after another;
  * processes: one process per core with 1 torch thread each, the folds shared out
    (what parallel trial workers or `embedded_comparison.py --jobs` do);
  * single:    one process, 1 thread (the reference).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_folds(folds: list[int], iters: int, threads: int, device: str = "cpu",
                start_at: float = 0.0) -> None:
    """Child process: train the given folds of proxy_anchor_glyphs; with `start_at` (a
    time.time()), wait for it after loading, then print the training's start and end times."""
    import torch

    sys.path.insert(0, str(REPO))
    from harness.config import load_study
    from harness.data import prepare_data
    from harness.train import train_fold

    torch.set_num_threads(threads)
    cfg = load_study("proxy_anchor_glyphs", profile="embedded", overrides=[
        f"train.max_epochs={iters // 20}", "train.patience=1000"])
    data = prepare_data(cfg)
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # the CUDA context, before the timings
    if start_at:
        # Warm-up (CUDA's lazy module loading, cuDNN's handles and algorithm choices): a study
        # trains many folds in one process, so its steady state is what counts.
        warm = load_study("proxy_anchor_glyphs", profile="embedded", overrides=[
            "train.max_epochs=2", "train.patience=1000"])
        with tempfile.TemporaryDirectory() as tmp:
            train_fold(warm, data, data.split.folds[0], torch.device(device), seed=0,
                       run_dir=Path(tmp))
        if time.time() > start_at:
            raise SystemExit("loading took longer than the agreed start; raise the delay")
        time.sleep(start_at - time.time())
    began = time.time()
    for k in folds:
        with tempfile.TemporaryDirectory() as tmp:
            train_fold(cfg, data, data.split.folds[k % 4], torch.device(device), seed=k,
                       run_dir=Path(tmp))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"TIMES {began} {time.time()}", flush=True)


def launch(folds: list[int], iters: int, threads: int, device: str = "cpu",
           start_at: float = 0.0, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HARNESS_NO_PROGRESS": "1"}
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            f"from benchmarks.bench_embedded_parallel import train_folds; "
            f"train_folds({folds!r}, {iters}, {threads}, {device!r}, {start_at!r})")
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, **popen)


def shared_device(procs: int, iters: int, device: str, delay: float) -> float:
    """Iterations per second of `procs` processes training one fold each on one device, from
    the agreed start to the last one's end."""
    start_at = time.time() + delay
    children = [launch([k], iters, 1, device, start_at, stdout=subprocess.PIPE, text=True)
                for k in range(procs)]
    outputs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        raise SystemExit(f"a benchmark process failed ({procs} processes)")
    ends = [float(line.split()[2]) for out in outputs for line in out.splitlines()
            if line.startswith("TIMES ")]
    return procs * iters / (max(ends) - start_at)


def device_sharing(args) -> int:
    # Warm-up: render the glyphs (and build the trunk) outside the timings.
    launch([0], 20, 1, args.device, stdout=subprocess.DEVNULL).wait()
    print(f"processes sharing one {args.device} device, each training one fold of "
          f"{args.iters} iterations (proxy_anchor_glyphs, embedded profile, validation "
          f"included; loading and a 40-iteration warm-up left out)")
    print("| processes | iterations / s, all together | per process |")
    print("| ---: | ---: | ---: |")
    for procs in (int(p) for p in args.procs.split(",")):
        rate = shared_device(procs, args.iters, args.device, args.delay)
        print(f"| {procs} | {rate:.0f} | {rate / procs:.1f} |", flush=True)
    return 0


def timed(groups: list[list[int]], iters: int, threads: int) -> float:
    start = time.perf_counter()
    procs = [launch(g, iters, threads) for g in groups]
    if any(p.wait() for p in procs):
        raise SystemExit("a benchmark process failed")
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--procs", default="", help="e.g. 1,4,16: the device-sharing measurement")
    p.add_argument("--delay", type=float, default=30.0,
                   help="seconds from launch to the agreed start (covers loading)")
    args = p.parse_args()
    if args.procs:
        return device_sharing(args)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    folds = list(range(args.folds))
    # Warm-up: render the glyphs and build the trunk outside the timings.
    timed([[0]], 20, 1)
    runs = {"threads": timed([folds], args.iters, cores),
            "processes": timed([folds[i::cores] for i in range(cores)], args.iters, 1),
            "single": timed([folds], args.iters, 1)}
    print(f"{args.folds} fold trainings x {args.iters} iterations (proxy_anchor_glyphs, embedded "
          f"profile), {cores} CPU cores, process start and data loading included")
    print("| layout | wall s | folds / min | vs single |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in runs.items():
        print(f"| {name} | {seconds:.1f} | {60 * args.folds / seconds:.2f} | "
              f"{runs['single'] / seconds:.2f}x |")
    faster = "processes" if runs["processes"] < runs["threads"] else "threads"
    print(f"faster: {faster} ({runs['threads'] / runs['processes']:.2f}x threads' wall time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
