"""Time and memory of harness.metrics.retrieval_metrics at SOP size, against bare searches.

    python benchmarks/bench_eval.py                  # CPU
    python benchmarks/bench_eval.py --device cuda    # a GPU, when available
    python benchmarks/bench_eval.py --dims 128 --no-pml

Data: SOP-like self-retrieval, 60,502 embeddings, 11,317 classes (2 to 12 images each, ~5.3 on
average), clustered (class centre + noise) so the metrics are neither 0 nor 1; dimension 128
(one fold model) and 512 (4 concatenated).

Measured (median of --repeats interleaved rounds; pml once), each in a fresh subprocess so that
its peak RSS is its own (ru_maxrss never goes down within a process):
  * ours/torch, ours/faiss: retrieval_metrics with that backend (k = max class size - 1, as
    the metrics need);
  * bare/torch: the same chunked matmul + top-k alone, no metric bookkeeping: the floor for the
    torch backend;
  * bare/faiss: IndexFlatIP add + search(k + 1) alone: the floor for the faiss backend;
  * pml: pytorch-metric-learning 2.9.0 AccuracyCalculator(include=(precision_at_1, r_precision,
    mean_average_precision_at_r), k="max_bin_count") at dimension 128 only (once; it is the
    memory-hungry one).
"base RSS" is the subprocess after imports and data creation; "peak RSS" its maximum. "vs bare"
is the time over the bare search of the same backend (pml: over bare/faiss, the search it uses).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from harness.metrics import relevant_counts, retrieval_metrics  # noqa: E402

NUM_ITEMS = 60_502
NUM_CLASSES = 11_317
CHUNK = 4096
# Noise per dimension, for SOP-like difficulty: 128-d P@1 ~0.61, MAP@R ~0.30; 512-d P@1 ~0.79,
# MAP@R ~0.43 (higher dimensions separate random centres more easily). Timings do not depend on it.
NOISE = {128: 1.5, 512: 2.2}


def sop_like(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class sizes 2..12 summing to NUM_ITEMS; embeddings = unit class centre + noise."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.full((NUM_CLASSES,), 2)
    extra = torch.multinomial(torch.ones(NUM_CLASSES), NUM_ITEMS - 2 * NUM_CLASSES,
                              replacement=True, generator=g)
    sizes += torch.bincount(extra, minlength=NUM_CLASSES).clamp(max=10)
    while int(sizes.sum()) < NUM_ITEMS:  # top up classes the clamp cut short
        room = torch.nonzero(sizes < 12).flatten()
        sizes[room[torch.randint(len(room), (1,), generator=g)]] += 1
    labels = torch.repeat_interleave(torch.arange(NUM_CLASSES), sizes)
    labels = labels[torch.randperm(NUM_ITEMS, generator=g)]
    centres = F.normalize(torch.randn(NUM_CLASSES, dim, generator=g), dim=1)
    noise = torch.randn(NUM_ITEMS, dim, generator=g) / dim ** 0.5
    return centres[labels] + NOISE.get(dim, 1.5) * noise, labels


def needed_k(labels: torch.Tensor) -> int:
    return int(relevant_counts(labels, labels, True).max())


def bare_torch(x: torch.Tensor, labels: torch.Tensor, device: str) -> dict:
    x = F.normalize(x, dim=1).to(device)
    k = needed_k(labels)
    block = torch.empty(CHUNK, len(x), device=device)  # reused, as in retrieval_metrics
    for start in range(0, len(x), CHUNK):
        chunk = x[start:start + CHUNK]
        torch.mm(chunk, x.T, out=block[:len(chunk)]).topk(k + 1, dim=1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {}


def bare_faiss(x: torch.Tensor, labels: torch.Tensor, device: str) -> dict:
    import faiss
    x = F.normalize(x, dim=1).numpy()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    k = needed_k(labels)
    for start in range(0, len(x), CHUNK):
        index.search(x[start:start + CHUNK], k + 1)
    return {}


def ours(backend: str):
    def run(x: torch.Tensor, labels: torch.Tensor, device: str) -> dict:
        out = retrieval_metrics(x, labels, backend=backend, device=device, chunk_size=CHUNK)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out
    return run


def pml(x: torch.Tensor, labels: torch.Tensor, device: str) -> dict:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    calc = AccuracyCalculator(include=("precision_at_1", "r_precision",
                                       "mean_average_precision_at_r"), k="max_bin_count",
                              device=torch.device(device))
    out = calc.get_accuracy(F.normalize(x, dim=1), labels)
    return {"precision_at_1": out["precision_at_1"], "r_precision": out["r_precision"],
            "map_at_r": out["mean_average_precision_at_r"]}


METHODS = {"ours/torch": ours("torch"), "ours/faiss": ours("faiss"),
           "bare/torch": bare_torch, "bare/faiss": bare_faiss, "pml": pml}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(method: str, dim: int, device: str) -> None:
    """Run one measurement and print it as JSON (the subprocess side)."""
    x, labels = sop_like(dim)
    base = peak_rss_mb()
    start = time.perf_counter()
    metrics = METHODS[method](x, labels, device)
    seconds = time.perf_counter() - start
    print(json.dumps({"method": method, "dim": dim, "seconds": seconds, "base_rss_mb": base,
                      "peak_rss_mb": peak_rss_mb(), "metrics": metrics}))


def measure(method: str, dim: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--dims", str(dim), "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} d={dim} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run with the median time, plus the spread of all runs."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    out = dict(ordered[len(ordered) // 2])
    out["spread"] = (f"{ordered[0]['seconds']:.1f}-{ordered[-1]['seconds']:.1f}"
                     if len(runs) > 1 else "")
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return out


def print_table(rows: list[dict]) -> None:
    floor = {(r["dim"], r["method"].split("/")[-1]): r["seconds"]
             for r in rows if r["method"].startswith("bare/")}
    print(f"{'method':<12} {'dim':>4} {'median s':>8} {'(range)':>11} {'vs bare':>8} "
          f"{'base RSS':>9} {'peak RSS':>9}  P@1      R-Prec   MAP@R")
    for r in rows:
        backend = r["method"].split("/")[-1]
        ratio = ""
        if r["method"].startswith("ours/") and (r["dim"], backend) in floor:
            ratio = f"{r['seconds'] / floor[(r['dim'], backend)]:.2f}x"
        if r["method"] == "pml" and (r["dim"], "faiss") in floor:
            ratio = f"{r['seconds'] / floor[(r['dim'], 'faiss')]:.2f}x"
        m = r["metrics"]
        scores = (f"{m['precision_at_1']:.6f} {m['r_precision']:.6f} {m['map_at_r']:.6f}"
                  if m else "")
        print(f"{r['method']:<12} {r['dim']:>4} {r['seconds']:>8.2f} {r['spread']:>11} "
              f"{ratio:>8} {r['base_rss_mb']:>7.0f}MB {r['peak_rss_mb']:>7.0f}MB  {scores}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", default="128,512", help="comma-separated dimensions")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds per measurement (median reported)")
    parser.add_argument("--no-pml", action="store_true", help="skip pml's AccuracyCalculator")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dims = [int(d) for d in args.dims.split(",")]
    if args.child:
        child(args.child, dims[0], args.device)
        return
    x, labels = sop_like(dims[0])
    print(f"SOP-like self-retrieval: {NUM_ITEMS} items, {NUM_CLASSES} classes, k = "
          f"{needed_k(labels)}, chunk {CHUNK}, device {args.device}, "
          f"{torch.get_num_threads()} torch threads")
    runs: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(args.repeats):  # interleaved rounds: machine noise hits all alike
        for dim in dims:
            for method in ("bare/torch", "ours/torch", "bare/faiss", "ours/faiss"):
                run = measure(method, dim, args.device)
                runs.setdefault((method, dim), []).append(run)
                print(f"  round {round_ + 1}: {method} d={dim}: {run['seconds']:.1f} s",
                      flush=True)
    rows = [median_run(r) for r in runs.values()]
    if not args.no_pml and 128 in dims:
        rows.append(median_run([measure("pml", 128, args.device)]))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
