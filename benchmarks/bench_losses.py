"""Forward + backward time of every registry loss, relative to pml's ProxyAnchorLoss.

    python benchmarks/bench_losses.py                 # CPU
    python benchmarks/bench_losses.py --device cuda   # a GPU, when available

Settings: embedding 128; batches of 32 and 180 from an m-per-class sampler (m = 4); 98 classes
(Cars196 train classes) and 11,318 classes (SOP train classes). Every loss is built from the
registry with its defaults. All losses of one setting are timed in the same process, in
interleaved rounds (one forward+backward of each loss per round, after warm-up rounds) so that
machine noise hits them alike; the table shows the median per loss, in ms and as a ratio to pml's
ProxyAnchorLoss of the same setting.

Proxy-ISA (and Proxy Synthesis around it) is measured in its steady state: epoch past the filter
start (memory and filter on), its memory queue full (55,000 entries by default) and per-class
counts as after a long run. Filling the queue through training would take thousands of steps, so
the buffers are written directly with plausible values (`steady_state`); every timed step then
does the full work: weights, filter, enqueue and the S_c refresh over the queue.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pytorch_metric_learning import losses as pml_losses  # noqa: E402

from losses import LOSSES, ProxyISALoss, build_loss  # noqa: E402

REFERENCE = "pml_proxy_anchor"
EMBEDDING = 128


def steady_state(loss: torch.nn.Module, generator: torch.Generator) -> None:
    """Put any Proxy-ISA inside `loss` into a long-run state: memory full, filter on."""
    for module in loss.modules():
        if not isinstance(module, ProxyISALoss):
            continue
        module.set_epoch(int(module.filter_start_epoch))
        with torch.no_grad():
            size, num_classes = module.queue_labels.numel(), module.num_real_classes
            feats = torch.randn(size, module.queue_feats.shape[1], generator=generator)
            feats = torch.nn.functional.normalize(feats, dim=1)
            labels = torch.randint(0, num_classes, (size,), generator=generator)
            module.queue_feats.copy_(feats)
            module.queue_labels.copy_(labels)
            module.queue_class_sum.zero_().index_add_(0, labels, feats.double())
            module.queue_class_count.copy_(torch.bincount(labels, minlength=num_classes))
            module.queue_size.fill_(size)
            module.queue_ptr.fill_(int(torch.randint(0, size, (), generator=generator)))
            counts = torch.randint(10, 400, (num_classes,), generator=generator)
            module.class_counts.copy_(counts)
            b = (module.V - 1) / module.V
            module.effective_num.copy_((1 - b ** counts.double()) / (1 - b))
            module.similarity.copy_(module.h * torch.rand(num_classes, generator=generator,
                                                          dtype=torch.float64))


def make_losses(num_classes: int, names: list[str], device: torch.device, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    built = {REFERENCE: pml_losses.ProxyAnchorLoss(num_classes, EMBEDDING)}
    for name in names:
        built[name] = build_loss(name, num_classes, EMBEDDING)
    for loss in built.values():
        steady_state(loss, g)
    return {name: loss.to(device) for name, loss in built.items()}


def one_step(loss, x, labels):
    for p in loss.parameters():
        p.grad = None
    x.grad = None
    value = loss(x, labels)
    value.backward()
    return value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_setting(batch: int, num_classes: int, names, device, warmup: int, repeats: int,
                  seed: int = 0) -> dict[str, float]:
    losses = make_losses(num_classes, names, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    classes = torch.randperm(num_classes, generator=g)[: batch // 4]
    labels = classes.repeat_interleave(4).to(device)
    x = torch.randn(len(labels), EMBEDDING, generator=g).to(device).requires_grad_()
    times = {name: [] for name in losses}
    for round_ in range(warmup + repeats):
        for name, loss in losses.items():
            sync(device)
            start = time.perf_counter()
            value = one_step(loss, x, labels)
            sync(device)
            elapsed = time.perf_counter() - start
            if not torch.isfinite(value):
                raise RuntimeError(f"{name}: non-finite loss {float(value)}")
            if round_ >= warmup:
                times[name].append(elapsed * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 180])
    parser.add_argument("--classes", type=int, nargs="+", default=[98, 11318])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--losses", nargs="+", default=sorted(LOSSES), help="registry names")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    settings = [(b, c) for c in args.classes for b in args.batches]
    results = {}
    for batch, num_classes in settings:
        t0 = time.perf_counter()
        results[(batch, num_classes)] = bench_setting(batch, num_classes, args.losses, device,
                                                      args.warmup, args.repeats)
        print(f"# batch {batch}, {num_classes} classes: {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)

    what = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"Forward+backward, embedding {EMBEDDING}, m=4 per class; median of {args.repeats} "
          f"after {args.warmup} warm-up rounds; {what}; torch {torch.__version__}")
    print("ratio = time / time of pml ProxyAnchorLoss in the same setting (ms in brackets)\n")
    headers = [f"B={b}, C={c}" for b, c in settings]
    names = [REFERENCE] + list(args.losses)
    labels = {name: "pml ProxyAnchorLoss" if name == REFERENCE else name for name in names}
    width = max(len(v) for v in labels.values())
    cell = 21  # "  1.00 (    1.52 ms)"
    print(f"| {'loss':<{width}} | " + " | ".join(f"{h:>{cell}}" for h in headers) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * (cell + 2) for _ in headers) + "|")
    for name in names:
        cells = []
        for setting in settings:
            ms = results[setting][name]
            ratio = ms / results[setting][REFERENCE]
            cells.append(f"{ratio:>7.2f} ({ms:>8.2f} ms)")
        print(f"| {labels[name]:<{width}} | " + " | ".join(f"{c:>{cell}}" for c in cells) + " |")


if __name__ == "__main__":
    main()
