"""Speed ratios of the harness against its own ceilings, measured in one run.

    python -m harness.bench                      # CUDA when present, else CPU
    python -m harness.bench --device cpu --quick # a couple of minutes on 2 CPU cores
    python -m harness.bench --out results/bench  # also writes bench_<device>.md / .json

What it measures (ratios are taken within this one run, so they hold on noisy machines):

1. input pipeline: training images/s of the real path (JPEG files on disk -> decode-once uint8
   cache -> m-per-class loader with workers -> crop in the workers -> flip + normalise on the
   device -> model + loss + both optimizers) divided by the images/s of the same model, loss and
   optimizers fed a batch of random tensors already on the device (the ceiling). Target >= 0.9.
   Also the same real path without the cache (decode + resize every image every time).
   Data: synthetic JPEGs at CUB's typical 500x375 (written to a temporary folder), so no data
   set is needed; the trunk starts from random weights (speed does not depend on them).
2. mixed precision: images/s of the ceiling step in bf16 autocast / float32, channels_last /
   contiguous, for BN-Inception and ResNet-50 (GPU only; the harness runs float32 on CPU).
3. workers per GPU: aggregate training images/s of K concurrent worker processes on one device
   (K = 1, 2, 4, 8; each runs the ceiling step of its own model) divided by K = 1, per trunk,
   and the --workers-per-gpu it recommends: the smallest K within 5% of the best ratio, when
   the best is at least 1.1x (else 1: sharing does not pay). On CPU the K workers split the
   cores (as harness.workers does): the ratio there shows the mechanism, not a GPU's gain.
4. evaluation: harness.metrics.retrieval_metrics (P@1, R@K, R-Precision, MAP@R) at SOP's test
   size (60,502 x 512 by default) divided by the bare chunked matmul + top-k of the same data,
   which any retrieval evaluation must do. Target <= 1.5.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from harness.config import StudyConfig
from harness.data import PreparedData, batch_transform, loader_workers, train_loader
from harness.datasets.base import Records
from harness.image_cache import build_or_open
from harness.metrics import retrieval_metrics
from harness.splits import make_split
from harness.train import build_fold_modules, training_step
from harness.workers import cpu_count


def synthetic_jpegs(folder: Path, classes: int, per_class: int, size=(500, 375),
                    seed: int = 0) -> Records:
    """JPEGs with CUB-like size and entropy (smooth colour fields plus noise)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths, labels = [], []
    for c in range(classes):
        for k in range(per_class):
            base = np.stack([np.sin(xx / (20 + c) + k), np.cos(yy / (15 + k) + c),
                             np.sin((xx + yy) / 30)], axis=2)
            img = ((base + 1) * 100 + rng.normal(0, 20, (h, w, 3))).clip(0, 255)
            path = folder / f"{c:04d}_{k:03d}.jpg"
            Image.fromarray(img.astype(np.uint8)).save(path, quality=90)
            paths.append(path)
            labels.append(c)
    return Records(name=f"bench_{classes}x{per_class}", labels=np.array(labels), paths=paths,
                   images=None, partition=None, root=folder)


def bench_config(device: torch.device, args) -> StudyConfig:
    cfg = StudyConfig(name="bench")
    cfg.model.trunk, cfg.model.pretrained = args.trunk, False
    cfg.model.embedding_size = 128
    cfg.data.crop, cfg.data.resize = args.crop, args.resize
    cfg.data.num_workers = args.workers
    cfg.train.batch_size = args.batch
    cfg.train.iters_per_epoch = args.iters + args.warmup
    cfg.train.amp = device.type == "cuda"
    cfg.loss.name = "proxy_anchor"
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_images_per_s(cfg: StudyConfig, data: PreparedData, device, warmup: int,
                      iters: int) -> float:
    indices = np.arange(len(data.records))
    classes = np.unique(data.records.labels)
    model, loss_fn, model_opt, loss_opt = build_fold_modules(cfg, len(classes), device)
    loader, _ = train_loader(cfg, data, indices, seed=0, device=device)
    to_input = batch_transform(cfg, device, train=True)
    label_map = torch.as_tensor(classes)
    start, seen = None, 0
    for step, (images, labels) in enumerate(loader):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        images = to_input(images.to(device, non_blocking=True))
        labels = torch.searchsorted(label_map, labels).to(device, non_blocking=True)
        training_step(model, loss_fn, model_opt, loss_opt, images, labels, cfg.train.amp)
        if step >= warmup:
            seen += len(labels)
    _sync(device)
    return seen / (time.perf_counter() - start)


def ceiling_images_per_s(cfg: StudyConfig, device, warmup: int, iters: int,
                         num_classes: int, amp: bool, channels_last: bool) -> float:
    model, loss_fn, model_opt, loss_opt = build_fold_modules(cfg, num_classes, device)
    if not channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    b, m = cfg.train.batch_size, cfg.train.m_per_class
    images = torch.randn(b, 3, cfg.data.crop, cfg.data.crop, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(b // m, device=device).repeat_interleave(m)
    for step in range(warmup + iters):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        training_step(model, loss_fn, model_opt, loss_opt, images, labels, amp)
    _sync(device)
    return iters * b / (time.perf_counter() - start)


def _concurrent_worker(trunk: str, args: dict, device: str, threads: int, warmup: int,
                       seconds: float, num_classes: int, barrier, results) -> None:
    """One of K workers: warm up, wait for the others, then train for `seconds`."""
    try:
        torch.set_num_threads(threads)
        dev = torch.device(device)
        cfg = bench_config(dev, argparse.Namespace(**{**args, "trunk": trunk}))
        amp = dev.type == "cuda"
        model, loss_fn, model_opt, loss_opt = build_fold_modules(cfg, num_classes, dev)
        b, m = cfg.train.batch_size, cfg.train.m_per_class
        images = torch.randn(b, 3, cfg.data.crop, cfg.data.crop, device=dev)
        if amp and cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.arange(b // m, device=dev).repeat_interleave(m)
        for _ in range(warmup):
            training_step(model, loss_fn, model_opt, loss_opt, images, labels, amp)
        _sync(dev)
        barrier.wait()
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            training_step(model, loss_fn, model_opt, loss_opt, images, labels, amp)
            steps += 1
        _sync(dev)
        results.put(steps * b / (time.perf_counter() - start))
    except Exception as e:  # noqa: BLE001 (out of memory at large K: reported, not fatal)
        barrier.abort()
        results.put(f"{type(e).__name__}: {e}")


def concurrent_images_per_s(trunk: str, args: argparse.Namespace, device: torch.device, k: int,
                            seconds: float, num_classes: int) -> float | str:
    """Aggregate training images/s of k worker processes sharing the device (a string: why
    it failed, e.g. out of memory)."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    barrier, results = ctx.Barrier(k), ctx.Queue()
    keys = ("crop", "resize", "workers", "batch", "iters", "warmup")
    plain = {key: getattr(args, key) for key in keys}
    threads = max(1, cpu_count() // k)  # harness.workers splits the cores likewise
    procs = [ctx.Process(target=_concurrent_worker, args=(
        trunk, plain, str(device), threads, args.warmup, seconds, num_classes, barrier, results))
        for _ in range(k)]
    for proc in procs:
        proc.start()
    try:  # a worker killed outright (out of host memory) never answers
        speeds = [results.get(timeout=seconds + 900) for _ in procs]
    except queue.Empty:
        speeds = ["a worker died without an answer"]
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    errors = [s for s in speeds if isinstance(s, str) and "BrokenBarrier" not in s]
    if errors or any(isinstance(s, str) for s in speeds):
        return errors[0] if errors else "a worker failed"
    return float(sum(speeds))


def recommend_workers_per_gpu(ratios: dict[int, float]) -> int:
    """The smallest K within 5% of the best aggregate ratio, if sharing gains >= 10%."""
    best = max(ratios.values())
    if best < 1.1:
        return 1
    return min(k for k, r in ratios.items() if r >= 0.95 * best)


def eval_ratio(n: int, dim: int, classes: int, device, repeats: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n,), generator=g)
    emb = torch.randn(classes, dim, generator=g)[labels] + 1.5 * torch.randn(n, dim, generator=g)
    k = int(torch.bincount(labels).max()) - 1

    def bare() -> None:  # normalise, chunked similarity, top-(k+1): the unavoidable work
        x = F.normalize(emb.to(device), dim=1)
        for s in range(0, n, 4096):
            torch.topk(x[s:s + 4096] @ x.T, k + 1, dim=1).indices.cpu()
        _sync(device)

    def ours() -> None:
        retrieval_metrics(emb, labels, backend="torch", device=device)
        _sync(device)

    times = {}
    for name, fn in (("bare", bare), ("ours", ours)):
        fn()  # warm-up (CUDA kernels, allocator)
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        times[name] = float(np.median(runs))
    return {"n": n, "dim": dim, "k": k, "bare_s": times["bare"], "ours_s": times["ours"],
            "ratio": times["ours"] / times["bare"]}


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, " \
           f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"


def workers_per_gpu_rows(args, device: torch.device, n_classes: int, record: dict) -> list:
    """Rows (and record["workers_per_gpu"]): aggregate img/s of K workers / K = 1, per trunk."""
    rows = []
    ks = sorted(set(args.concurrency) | ({1} if args.concurrency else set()))
    for trunk in args.concurrency_trunks if ks else []:
        speeds = {}
        for k in ks:
            speeds[k] = concurrent_images_per_s(trunk, args, device, k, args.concurrency_s,
                                                n_classes)
            if isinstance(speeds[k], str):  # out of memory: larger K would fail too
                break
        ok = {k: v for k, v in speeds.items() if not isinstance(v, str)}
        if 1 not in ok:
            rows.append((f"{trunk}: workers per {device.type.upper()}", "failed",
                         str(speeds.get(1))[:120]))
            continue
        ratios = {k: v / ok[1] for k, v in ok.items()}
        for k, v in speeds.items():
            rows.append((f"{trunk}: {k} workers on one {device.type.upper()}, aggregate img/s",
                         f"{v:,.0f}" if k in ok else "failed",
                         f"{ratios[k]:.2f}x 1 worker" if k in ok else str(v)[:120]))
        best = recommend_workers_per_gpu(ratios)
        rows.append((f"{trunk}: recommended --workers-per-gpu", str(best),
                     f"{ratios[best]:.2f}x 1 worker"))
        record.setdefault("workers_per_gpu", {})[trunk] = {
            "images_per_s": {str(k): v for k, v in speeds.items()},
            "ratio": {str(k): r for k, r in ratios.items()}, "recommended": best,
            "seconds": args.concurrency_s}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true",
                        help="CPU-sized: small_cnn at 64 px, fewer images, 20k-image eval")
    parser.add_argument("--trunk", default=None, help="default bninception (quick: small_cnn)")
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--resize", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1, help="-1 = the harness default")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best kept)")
    parser.add_argument("--images", type=int, default=None, help="synthetic JPEGs to write")
    parser.add_argument("--eval-n", type=int, default=None)
    parser.add_argument("--eval-dim", type=int, default=512)
    parser.add_argument("--amp-trunks", default="bninception,resnet50",
                        help="GPU only: trunks whose step is timed in bf16/fp32 x memory formats")
    parser.add_argument("--concurrency", default=None,
                        help="K values for workers per GPU, e.g. 1,2,4,8 (quick: 1,2; '' skips)")
    parser.add_argument("--concurrency-trunks", default=None,
                        help="trunks for workers per GPU (default bninception,resnet50; "
                             "quick: the --trunk)")
    parser.add_argument("--concurrency-s", type=float, default=None,
                        help="seconds each K is timed (default 20, quick 5)")
    parser.add_argument("--out", default="", help="folder for bench_<device>.md/.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    quick = args.quick
    args.trunk = args.trunk or ("small_cnn" if quick else "bninception")
    args.crop = args.crop or (64 if quick else 227)
    args.resize = args.resize or (72 if quick else 256)
    args.iters = args.iters or (30 if quick else 200)
    n_images = args.images or (400 if quick else 2000)
    eval_n = args.eval_n or (20_000 if quick else 60_502)

    ks = args.concurrency if args.concurrency is not None else ("1,2" if quick else "1,2,4,8")
    args.concurrency = [int(k) for k in ks.split(",") if k.strip()]
    args.concurrency_trunks = (args.concurrency_trunks or
                               (args.trunk if quick else "bninception,resnet50")).split(",")
    args.concurrency_s = args.concurrency_s or (5.0 if quick else 20.0)
    cfg = bench_config(device, args)
    rows, record = [], {"device": str(device), "hardware": hardware(device),
                        "config": {"trunk": args.trunk, "crop": args.crop, "resize": args.resize,
                                   "batch": args.batch, "workers": loader_workers(cfg),
                                   "iters": args.iters, "warmup": args.warmup,
                                   "rounds": args.rounds,
                                   "images": n_images, "loss": cfg.loss.name}}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        records = synthetic_jpegs(Path(tmp) / "jpegs", classes=n_images // 20, per_class=20)
        record["write_jpegs_s"] = time.perf_counter() - t
        t = time.perf_counter()
        resized = build_or_open(records, args.resize, Path(tmp) / "cache")
        record["build_cache_s"] = time.perf_counter() - t
        split = make_split(records, "mlrc")
        cached = PreparedData(spec=None, records=records, split=split, resized=resized)
        uncached = PreparedData(spec=None, records=records, split=split, resized=None)
        n_classes = len(np.unique(records.labels))
        amp = device.type == "cuda"
        # Interleaved rounds, best of each: a background hiccup lowers one round, not a ratio.
        ceiling = real = slow = 0.0
        for _ in range(args.rounds):
            ceiling = max(ceiling, ceiling_images_per_s(
                cfg, device, args.warmup, args.iters, n_classes, amp=amp,
                channels_last=amp and cfg.train.channels_last))
            real = max(real, real_images_per_s(cfg, cached, device, args.warmup, args.iters))
            slow = max(slow, real_images_per_s(cfg, uncached, device, args.warmup, args.iters))
    rows.append(("training img/s, random tensors on the device (ceiling)", f"{ceiling:,.0f}", ""))
    rows.append(("training img/s, JPEGs via the uint8 cache", f"{real:,.0f}",
                 f"{real / ceiling:.3f} of ceiling (target >= 0.9)"))
    rows.append(("training img/s, JPEGs decoded every time (data.cache=false)", f"{slow:,.0f}",
                 f"{slow / ceiling:.3f} of ceiling"))
    record.update(ceiling_img_s=ceiling, cached_img_s=real, uncached_img_s=slow,
                  input_ratio=real / ceiling, uncached_ratio=slow / ceiling)
    if device.type == "cuda":  # the ceiling step under each precision / memory format
        for trunk in args.amp_trunks.split(","):
            cfg_t = bench_config(device, args)
            cfg_t.model.trunk = trunk
            speeds = {}
            for amp_on, cl in ((True, True), (True, False), (False, True), (False, False)):
                speeds[(amp_on, cl)] = ceiling_images_per_s(
                    cfg_t, device, args.warmup, args.iters, n_classes, amp=amp_on,
                    channels_last=cl)
            base = speeds[(False, False)]
            for (amp_on, cl), v in speeds.items():
                name = f"{'bf16' if amp_on else 'fp32'}+{'channels_last' if cl else 'contiguous'}"
                rows.append((f"ceiling img/s, {trunk}, {name}", f"{v:,.0f}",
                             f"{v / base:.2f}x fp32+contiguous"))
                record.setdefault("precision", {})[f"{trunk}/{name}"] = v
    rows += workers_per_gpu_rows(args, device, n_classes, record)
    ev = eval_ratio(eval_n, args.eval_dim, classes=max(eval_n // 5, 2), device=device)
    rows.append((f"evaluation {ev['n']:,} x {ev['dim']} (k={ev['k']}): ours / bare top-k",
                 f"{ev['ours_s']:.2f} s vs {ev['bare_s']:.2f} s",
                 f"{ev['ratio']:.2f}x (target <= 1.5)"))
    record["eval"] = ev

    lines = [f"# harness.bench on {record['hardware']}", "",
             f"config: {json.dumps(record['config'])}; synthetic JPEGs written in "
             f"{record['write_jpegs_s']:.1f} s, cache built in {record['build_cache_s']:.1f} s",
             "", "| measurement | value | ratio |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"bench_{device.type}.md").write_text(text + "\n")
        (out / f"bench_{device.type}.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
