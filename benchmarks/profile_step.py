"""Where the time of an embedded training step goes (issue #12: on an H100 one embedded study
trains only about 110 iterations per second, results/bench/gpu_step_h100/).

    python benchmarks/profile_step.py [--study proxy_anchor_glyphs] [--device cuda] \
        [--iters 200] [--top 25]

Trains fold 0 of the study (embedded profile, pretrained glyph trunk) for `--iters` iterations
with validation as the profile does, three times: once to warm up, once timed (iterations per
second), once under torch.profiler. Prints the profiler's busiest operations by their own CPU
time, and per iteration: the wall time, the CPU time spent inside torch operations, and (on
CUDA) the time the GPU spent in kernels. Wall time far above kernel time means the step is bound
by the CPU side (Python, dispatch, launches), not by the GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train_once(cfg, data, device) -> float:
    """Seconds to train fold 0 as configured (the device synchronised at the end)."""
    import torch

    from harness.train import train_fold

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train_fold(cfg, data, data.split.folds[0], device, seed=0, run_dir=Path(tmp))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="proxy_anchor_glyphs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from harness.config import load_study
    from harness.data import prepare_data, resolve_device

    probe = load_study(args.study, profile="embedded")
    per_epoch = probe.train.iters_per_epoch
    if args.iters < per_epoch:
        raise SystemExit(f"--iters {args.iters}: at least one epoch ({per_epoch} iterations)")
    epochs = args.iters // per_epoch
    cfg = load_study(args.study, profile="embedded", overrides=[
        f"train.max_epochs={epochs}", "train.patience=1000", f"train.device={args.device}"])
    device = resolve_device(cfg.train.device)
    data = prepare_data(cfg)
    iters = epochs * per_epoch
    train_once(cfg, data, device)  # warm-up: allocator, cuDNN autotuning, caches
    seconds = train_once(cfg, data, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        profiled = train_once(cfg, data, device)
    events = prof.key_averages()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.study} on {device} ({name}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; {iters} "
          f"iterations, validation every {cfg.train.val_every_epochs * per_epoch}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    op_cpu = sum(e.self_cpu_time_total for e in events) / 1e3  # ms
    # Kernel time: the CUDA-side events only, as the table's "Self CUDA time total" counts it
    # (a CPU op's row repeats its kernels' time, and a user annotation such as
    # "Optimizer.step#Adam.step" projected on the GPU spans them too).
    kernel = sum(e.self_device_time_total for e in events
                 if e.device_type == DeviceType.CUDA
                 and not getattr(e, "is_user_annotation", False)) / 1e3
    print(f"per iteration: wall {1e3 * seconds / iters:.2f} ms ({iters / seconds:.1f} it/s, "
          f"no profiler); under the profiler: wall {1e3 * profiled / iters:.2f} ms, CPU inside "
          f"torch ops {op_cpu / iters:.2f} ms"
          + (f", GPU kernels {kernel / iters:.2f} ms" if device.type == "cuda" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
