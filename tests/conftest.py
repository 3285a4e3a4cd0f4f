"""Fixtures and helpers shared by the test modules, so that no test module imports another.

  * the tiny end-to-end study on the glyphs (`glyph_root`, `write_study`, `load`, `REPO`);
  * real JPEG files of awkward shapes (`write_jpegs`);
  * loss batches, slow reference losses and tolerances (`make_batch`, `ref_proxy_anchor`, ...);
  * the scripts of benchmarks/ as modules (`benchmark_script`).

Helpers are imported as `from conftest import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from harness.datasets.base import Records

REPO = Path(__file__).resolve().parent.parent

# The tests' folds last fractions of a second: without this they would never reach the
# 30 seconds after which a fold writes its resume checkpoint (harness.train.CHECKPOINT_SECONDS),
# and the resume tests would test nothing. tests/test_checkpoint_interval.py runs the default.
os.environ.setdefault("HARNESS_CHECKPOINT_SECONDS", "0")


def benchmark_script(name: str):
    """benchmarks/NAME.py loaded as a module (benchmarks/ is not a package), registered under
    NAME so that a process pool can pickle its functions by reference."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def tiny_glyph_trunk(tmp_path_factory):
    """In-process tests that use the pretrained glyph trunk (the embedded profile) get a tiny
    one, built once per session in a temporary folder, never the user's cached 512-class one."""
    from harness import glyph_trunk

    root = tmp_path_factory.mktemp("glyph_trunk")
    saved = glyph_trunk.DEFAULT_PARAMS, glyph_trunk.default_trunk_root
    glyph_trunk.DEFAULT_PARAMS = TINY_TRUNK
    glyph_trunk.default_trunk_root = lambda: root
    yield root
    glyph_trunk.DEFAULT_PARAMS, glyph_trunk.default_trunk_root = saved


def _tiny_trunk_params():
    from harness.glyph_trunk import PretrainParams

    return PretrainParams(num_classes=12, per_class=6, epochs=1, batch_size=16)


TINY_TRUNK = _tiny_trunk_params()


# -------------------------------------------------------------------------------------------
# The tiny end-to-end study (harness.run on the glyphs)
# -------------------------------------------------------------------------------------------
TINY_STUDY = """
description = "tiny end-to-end study for tests"
[data]
dataset = "glyphs"
root = "{root}"
glyph_classes = 32
glyph_per_class = 8
resize = 36
crop = 32
scale_min = 0.5
num_workers = 0
[model]
trunk = "small_cnn"
pretrained = false
embedding_size = 16
freeze_bn = false
[loss]
name = "{loss}"
[train]
optimizer = "adam"
lr = 1e-3
loss_optimizer = "adam"
batch_size = 16
iters_per_epoch = {iters}
max_epochs = 2
val_every_epochs = 1
patience = 5
eval_batch_size = 64
[search]
trials = 2
n_startup_trials = 1
pruner = "none"
[final]
reproductions = 1
"""


@pytest.fixture(scope="module")
def glyph_root(tmp_path_factory):
    return tmp_path_factory.mktemp("glyphs")


def write_study(tmp_path: Path, glyph_root: Path, loss: str = "proxy_anchor", iters: int = 3,
                name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY_STUDY.format(root=glyph_root, loss=loss, iters=iters))
    return path


def load(output: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{output / 'study.db'}")


# -------------------------------------------------------------------------------------------
# Image files
# -------------------------------------------------------------------------------------------
SHAPES = [(375, 500), (500, 375), (300, 300), (120, 457), (641, 97)]


def kill_worker_mid_trial(load_study: Callable[[], optuna.Study], killed: dict,
                          deadline_s: float, poll_s: float = 0.5,
                          ready: Callable[[], bool] = lambda: True) -> None:
    """kill -9 the worker of the first RUNNING trial that has 1 to 3 of its 4 folds done, and
    record in `killed` its number, pid, finished folds and params (nothing if none is caught)."""
    deadline = time.time() + deadline_s
    while time.time() < deadline and not killed:
        time.sleep(poll_s)
        if not ready():
            continue
        try:
            trials = load_study().get_trials()
        except Exception:  # noqa: BLE001 (the study may not exist yet)
            continue
        for t in trials:
            done = t.user_attrs.get("fold_results", {})
            if t.state == optuna.trial.TrialState.RUNNING and 1 <= len(done) < 4:
                os.kill(t.user_attrs["pid"], signal.SIGKILL)
                killed.update(number=t.number, pid=t.user_attrs["pid"], done=dict(done),
                              params=t.params)
                return


def write_jpegs(folder: Path, shapes=SHAPES, seed=0) -> Records:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(shapes):
        # smooth content (JPEG of pure noise is fine too, but smooth images resize less trivially)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256,
                        rng.integers(0, 256, (h, w))], axis=2).astype(np.uint8)
        path = folder / f"img_{i}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return Records(name="fake", labels=np.arange(len(paths)) % 2, paths=paths, images=None,
                   partition=None, root=folder)


# -------------------------------------------------------------------------------------------
# Losses: batches, slow references (float64 loops over samples and proxies), tolerances
# -------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
BF16_TOL = dict(rtol=2e-2, atol=2e-2)  # bf16 matmuls under CPU autocast: ~3 significant digits


# -------------------------------------------------------------------------------------------
# Shared helpers (also imported by the other loss test files)
# -------------------------------------------------------------------------------------------
def m_per_class_labels(classes, m):
    """[c0]*m + [c1]*m + ...: what an m-per-class sampler yields."""
    return torch.tensor([c for c in classes for _ in range(m)])


def make_batch(labels, num_classes, dim=16, seed=0, near=0.0):
    """float64 leaf tensors X (B, D), P (C, D); `near` > 0 pulls each x toward its proxy."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    X = torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    if near:
        X = X + near * P[labels] / P[labels].norm(dim=1, keepdim=True) * math.sqrt(dim)
    return X.requires_grad_(), P.requires_grad_()


def unit(v):
    return v / torch.sqrt(torch.sum(v * v))


def ref_proxy_anchor(X, labels, P, alpha=32.0, delta=0.1, weights=None, z_pos=None, z_neg=None):
    """Proxy Anchor from its formula; weights[i][c] multiplies the exponent (Proxy-ISA)."""
    ys = [int(y) for y in labels]
    xs = [unit(X[i]) for i in range(len(ys))]
    ps = [unit(P[c]) for c in range(P.shape[0])]
    with_pos = sorted(set(ys))
    zero = torch.zeros((), dtype=torch.float64)
    pos_total, neg_total = zero, zero
    for c, p in enumerate(ps):
        pos_sum, neg_sum = zero, zero
        for i, x in enumerate(xs):
            s = torch.dot(x, p)
            m = 1.0 if weights is None else weights[i][c]
            if ys[i] == c:
                pos_sum = pos_sum + torch.exp(alpha * m * (delta - s))
            else:
                neg_sum = neg_sum + torch.exp(alpha * m * (s + delta))
        if c in with_pos:
            pos_total = pos_total + torch.log(1.0 + pos_sum)
        neg_total = neg_total + torch.log(1.0 + neg_sum)
    z_pos = len(with_pos) if z_pos is None else z_pos
    z_neg = len(ps) if z_neg is None else z_neg
    return pos_total / z_pos + neg_total / z_neg


def ref_proxy_nca_pp(X, labels, P, temperature):
    """-log softmax(-||x^ - p^||^2 / T) at the true proxy, averaged over the batch."""
    total = 0.0
    ps = [unit(P[c]) for c in range(P.shape[0])]
    for i, y in enumerate(int(v) for v in labels):
        x = unit(X[i])
        d = [torch.sum((x - p) ** 2) / temperature for p in ps]
        total = total + d[y] + torch.log(sum(torch.exp(-dc) for dc in d))
    return total / len(labels)


def run(loss, X, P, labels, dtype, param="proxies"):
    """Loss value and (embedding, proxy) gradients with X, P cast to `dtype`."""
    with torch.no_grad():
        getattr(loss, param).copy_(P.detach().to(dtype))  # P already in the parameter's layout
    x = X.detach().to(dtype).requires_grad_()
    loss.zero_grad()
    value = loss(x, labels)
    value.backward()
    return value, x.grad, getattr(loss, param).grad


def ref_grads(ref_value, X, P):
    gx, gp = torch.autograd.grad(ref_value, (X, P))
    return gx, gp


def assert_close(actual, expected, dtype_or_tol):
    tol = TOL[dtype_or_tol] if isinstance(dtype_or_tol, torch.dtype) else dtype_or_tol
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), **tol)
