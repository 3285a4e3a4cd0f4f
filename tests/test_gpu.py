"""CUDA checks: the same numbers on the GPU as on the CPU, and a bf16/channels_last training step.

Skipped without CUDA (CI has none). Run them on a GPU machine with `python -m pytest -m gpu`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from harness.config import load_study
from harness.data import fold_indices, prepare_data
from harness.metrics import retrieval_metrics
from harness.train import train_fold, use_float32_precision
from losses.registry import LOSSES, build_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def clustered(n_classes=300, per_class=5, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=g), labels


def test_float32_matmul_is_float32_by_default():
    """TF32 (10-bit mantissa) errs ~1e-2 here on Ampere and newer, float32 ~1e-4. (The cuDNN
    flag, whose numerics depend on the algorithm cuDNN picks, is checked on the CPU:
    tests/test_protocol_faults.py.)"""
    use_float32_precision(load_study("quickstart"))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 1024, generator=g), torch.randn(1024, 256, generator=g)
    exact = x.double() @ w.double()
    assert ((x.to(CUDA) @ w.to(CUDA)).cpu().double() - exact).abs().max() < 2e-3
    assert not torch.backends.cudnn.allow_tf32


def test_retrieval_metrics_on_gpu_equal_cpu():
    emb, labels = clustered()
    cpu = retrieval_metrics(emb, labels, backend="torch", device="cpu")
    gpu = retrieval_metrics(emb, labels, backend="torch", device=CUDA)
    for name, value in cpu.items():
        assert gpu[name] == pytest.approx(value, abs=2e-3), name


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_under_cuda_bf16_autocast_close_to_float32(name):
    torch.manual_seed(0)
    loss_fn = build_loss(name, num_classes=20, embedding_size=32).to(CUDA)
    x = torch.randn(32, 32, device=CUDA, requires_grad=True)
    labels = torch.arange(8, device=CUDA).repeat_interleave(4)
    # Proxy-ISA updates its memory on every call and Proxy Synthesis draws lambdas: the state
    # (generator included, as extra state) is restored so both calls see the same.
    state = copy.deepcopy(loss_fn.state_dict())
    reference = loss_fn(x, labels)
    loss_fn.load_state_dict(state)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = loss_fn(x, labels)
    assert torch.isfinite(mixed)
    assert float(mixed) == pytest.approx(float(reference), rel=5e-2, abs=5e-2)
    mixed.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in loss_fn.parameters() if p.requires_grad)


def test_train_fold_on_cuda_with_amp_and_channels_last(tmp_path: Path):
    cfg = load_study("quickstart", profile=None, overrides=[
        f"data.root={tmp_path / 'glyphs'}", "data.glyph_classes=32", "data.glyph_per_class=8",
        "train.iters_per_epoch=5", "train.max_epochs=2", "train.val_every_epochs=1",
        "train.amp=true", "train.channels_last=true"])
    data = prepare_data(cfg)
    result = train_fold(cfg, data, data.split.folds[0], CUDA, seed=1, run_dir=tmp_path / "fold")
    assert len(result.history) == 2
    assert 0.0 <= result.best_map_at_r <= 1.0
    assert Path(result.checkpoint).exists()
    _, val_idx = fold_indices(data, data.split.folds[0])
    assert result.history[-1]["num_queries"] == len(val_idx)
