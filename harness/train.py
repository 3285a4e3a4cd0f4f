"""Train one fold: the MLRC training loop, with validation, early stopping and checkpoints.

One readable loop (nanoGPT-style). Per fold:
  * trunk + embedder get one optimizer (MLRC: RMSprop lr 1e-6), the loss's own parameters
    (proxies, class weights) a second one whose lr (`train.loss_lr`) is searched: a large value
    is the "fast-moving proxies" idea, available to every loss with parameters;
  * an "epoch" is `train.iters_per_epoch` batches from the m-per-class sampler;
  * every `val_every` epochs the fold's validation classes are embedded and MAP@R computed
    (self-retrieval); the best model is kept (best.pt) and training stops when
    epoch - best_epoch > patience;
  * every validation also writes last.pt (models, optimizers, history). A killed run resumes
    from it. Random streams are re-seeded from (seed, epoch) at every epoch start, so a resumed
    fold continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import copy
import os
import random
import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness.config import StudyConfig
from harness.data import (PreparedData, batch_transform, dataset_defaults, eval_loader,
                          fold_indices, make_train_sampler, train_loader)
from harness.errors import HarnessError
from harness.frozen_features import (FromFrozenFeatures, TrainBatches, eval_batches,
                                     frozen_features)
from harness.run_folder import write_json_atomic
from harness.metrics import NonFiniteEmbeddings, compute_embeddings, retrieval_metrics
from harness.models import build_model
from harness.progress import bar
from harness.splits import Fold
from losses.registry import build_loss, get_loss_spec
from losses.sparse_centers_regularizer import set_collapse_gradient

# A callback the search gives to train_fold, called after every validation with (training
# iterations so far in this fold, validation MAP@R). It may raise (optuna.TrialPruned) to stop
# the fold: the fold is then never resumed.
ReportFn = Callable[[int, float], None]


@dataclass
class FoldResult:
    fold: int
    best_map_at_r: float
    best_metrics: dict
    best_epoch: int
    epochs_trained: int
    history: list[dict] = field(default_factory=list)  # one row per validation
    stop_reason: str = ""  # patience | max_epochs | diverged
    checkpoint: str = ""  # best.pt, when kept

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(*seed_parts: int) -> None:
    seed = int(np.random.SeedSequence(list(seed_parts)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# The optimisers a study may name (train.optimizer, train.loss_optimizer): config.validate
# checks names against this table, make_optimizer builds from it.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "rmsprop": lambda params, lr, weight_decay, momentum, adam_eps: torch.optim.RMSprop(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay),
    "adam": lambda params, lr, weight_decay, momentum, adam_eps: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay, eps=adam_eps),
    "adamw": lambda params, lr, weight_decay, momentum, adam_eps: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, eps=adam_eps),
    "sgd": lambda params, lr, weight_decay, momentum, adam_eps: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay),
}


def make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float,
                   adam_eps: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                            adam_eps=adam_eps)


def use_float32_precision(cfg: StudyConfig) -> None:
    """Float32 means float32 on CUDA too (PROTOCOL.md: "Float32 throughout"), unless
    `train.tf32` opts in: PyTorch lets cuDNN compute float32 convolutions in TF32 by default.
    Process-wide flags, so what trains (build_fold_modules) and what embeds set them from its
    config."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters training may update (requires_grad): for a model, all but those of
    frozen trunk blocks; for a loss, its proxies or class weights, if any."""
    return [p for p in module.parameters() if p.requires_grad]


def build_fold_modules(cfg: StudyConfig, num_classes: int, device: torch.device):
    """Model, loss and their optimizers for one fold, at the configured float32 precision
    (what trains with them, and what times their steps, computes as configured)."""
    use_float32_precision(cfg)
    m = cfg.model
    model = build_model(m).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # dataset: on some data sets MLRC fixed a parameter it searches elsewhere (SoftTriple's
    # reg_weight on SOP); the registry knows those values.
    loss_fn = build_loss(cfg.loss.name, num_classes=num_classes,
                         embedding_size=m.embedding_size, dataset=cfg.data.dataset,
                         **cfg.loss.params).to(device)
    t = cfg.train
    set_collapse_gradient(loss_fn, t.center_collapse_gradient)  # SoftTriple's regulariser
    # A frozen trunk block's parameters (model.frozen_blocks) are not optimised; with none
    # frozen this is every parameter, in the same order.
    model_opt = make_optimizer(t.optimizer, trainable(model), t.lr, t.weight_decay,
                               t.momentum, t.adam_eps)
    loss_params = trainable(loss_fn)
    loss_opt = None
    if loss_params:
        loss_opt = make_optimizer(t.loss_optimizer, loss_params, t.loss_lr,
                                  t.loss_weight_decay, t.momentum, t.adam_eps)
    return model, loss_fn, model_opt, loss_opt


def validate(cfg: StudyConfig, model, data: PreparedData, indices: np.ndarray,
             device: torch.device) -> dict:
    """MAP@R etc. on the fold's validation classes (self-retrieval)."""
    use_float32_precision(cfg)
    amp = _amp_enabled(cfg, device)
    if cfg.model.cache_frozen_features:  # the frozen blocks' output, computed once per image
        features = frozen_features(cfg, model, data, device, amp)
        batches = eval_batches(features, indices, data.records.labels, cfg.train.eval_batch_size)
        emb, labels = compute_embeddings(FromFrozenFeatures(model), batches, device, amp=amp,
                                         desc="validate")
    else:
        loader = eval_loader(cfg, data, indices, device)
        emb, labels = compute_embeddings(model, loader, device, amp=amp, desc="validate",
                                         batch_transform=batch_transform(cfg, device,
                                                                         train=False))
    return retrieval_metrics(emb, labels, device=device)


def fold_batches(cfg: StudyConfig, model, data: PreparedData, indices: np.ndarray, seed: int,
                 device: torch.device, amp: bool):
    """(batches, sampler, the model that takes them, the device-side input transform) of one
    fold's training: images through the whole model, or with model.cache_frozen_features the
    frozen blocks' cached output through the rest of it, in the same sampler's batches."""
    if not cfg.model.cache_frozen_features:
        loader, sampler = train_loader(cfg, data, indices, seed, device)
        return loader, sampler, model, batch_transform(cfg, device, train=True)
    features = frozen_features(cfg, model, data, device, amp)
    labels = data.records.labels[indices]
    sampler = make_train_sampler(cfg, labels, seed)
    batches = TrainBatches(features, indices, labels, sampler, cfg.train.batch_size)
    return batches, sampler, FromFrozenFeatures(model), torch.nn.Identity()


def _amp_enabled(cfg: StudyConfig, device: torch.device) -> bool:
    return cfg.train.amp and device.type == "cuda"


class CheckpointError(HarnessError):
    """A checkpoint in a run folder cannot be loaded (damaged, foreign or tampered with)."""


def _plain(obj):
    """`obj` with numpy scalars and arrays turned into Python numbers and tensors, so that the
    checkpoint loads with torch.load(weights_only=True) (tensors, dicts, lists, str, numbers,
    bool, None only)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    return obj


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(_plain(obj), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint written by `_atomic_save`, read as data only.

    Run folders may sit on shared disks: weights_only=True means a planted pickle cannot run
    code here; anything but tensors and plain values is refused with a CheckpointError."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path}: not a loadable checkpoint ({type(exc).__name__}: {first[:300]}). It is "
            f"damaged, was written by another program, or holds objects other than tensors and "
            f"plain values; nothing in it was executed. Delete {path.parent}/last.pt and "
            f"{path.parent}/best.pt to retrain that fold from its start.") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a harness checkpoint (expected a dict with a "
                              f"'model' entry). Delete it to retrain that fold from its start.")
    return ckpt


def training_step(model, loss_fn, model_opt, loss_opt, images: torch.Tensor,
                  labels: torch.Tensor, amp: bool, grad_clip: float = 0.0) -> torch.Tensor | None:
    """One optimisation step; returns the loss, or None (and no step) when it is not finite."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        embeddings = model(images)
    loss = loss_fn(embeddings.float(), labels)  # losses run in float32 for stability
    if not torch.isfinite(loss):
        return None
    model_opt.zero_grad(set_to_none=True)
    if loss_opt is not None:
        loss_opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip)  # proxies never clipped
    model_opt.step()
    if loss_opt is not None:
        loss_opt.step()
    return loss


# A fold writes the checkpoint it resumes from (last.pt, best.pt brought up to date first) at a
# validation once this many seconds have passed since it last wrote one, so an interrupt loses
# at most about this much training. An embedded fold lasts seconds and validates every few
# hundred milliseconds: writing at every validation cost it about 4% of its time.
CHECKPOINT_SECONDS = 30.0


def checkpoint_seconds() -> float:
    """CHECKPOINT_SECONDS, or HARNESS_CHECKPOINT_SECONDS (0 = at every validation)."""
    value = os.environ.get("HARNESS_CHECKPOINT_SECONDS", "")
    if not value:
        return CHECKPOINT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise HarnessError(f"HARNESS_CHECKPOINT_SECONDS={value!r}: expected a number of "
                           f"seconds >= 0 (0 = a checkpoint at every validation)")
    return seconds


def train_fold(cfg: StudyConfig, data: PreparedData, fold: Fold, device: torch.device,
               seed: int, run_dir: Path, report: ReportFn | None = None,
               desc: str = "") -> FoldResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = fold_indices(data, fold)
    classes = np.asarray(sorted(fold.train_classes))
    seed_everything(seed, 0)
    model, loss_fn, model_opt, loss_opt = build_fold_modules(cfg, len(classes), device)
    trunk_params = trainable(model.trunk)  # the warm-up freezes these only for a while
    val_every, patience = dataset_defaults(cfg, data.spec)
    t = cfg.train
    amp = _amp_enabled(cfg, device)

    state = {"epoch": 0, "best_map": -1.0, "best_epoch": 0, "best_metrics": {}, "history": []}
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.exists():  # resume an interrupted fold
        ckpt = load_checkpoint(last_path, device)
        try:
            model.load_state_dict(ckpt["model"])
            loss_fn.load_state_dict(ckpt["loss"])
            model_opt.load_state_dict(ckpt["model_opt"])
            if loss_opt is not None:
                loss_opt.load_state_dict(ckpt["loss_opt"])
            state = ckpt["state"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{last_path} does not fit this fold's model, loss or "
                                  f"optimizers ({type(e).__name__}: {str(e)[:300]}). Delete "
                                  f"it to retrain that fold from its start.") from None

    # After the resume: a checkpoint's frozen blocks get the cached features of those blocks.
    # to_input: flip + normalise on the device (images); nothing for cached features.
    loader, sampler, step_model, to_input = fold_batches(cfg, model, data, train_idx, seed,
                                                         device, amp)
    every, written = checkpoint_seconds(), time.monotonic()
    unsaved_best: dict | None = None  # the best model since best.pt was last written

    def write_best() -> None:
        nonlocal unsaved_best
        if unsaved_best is not None:
            _atomic_save(unsaved_best, best_path)
            unsaved_best = None

    # Labels arrive as data-set class ids; losses want 0..C-1 for this fold's train classes.
    label_map = torch.as_tensor(classes)
    stop_reason = "max_epochs"
    epochs = bar(range(state["epoch"] + 1, t.max_epochs + 1), desc=desc or f"fold {fold.index}",
                 unit="epoch", initial=state["epoch"], total=t.max_epochs)
    for epoch in epochs:
        seed_everything(seed, epoch)
        sampler.set_epoch(epoch)
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)  # Proxy-ISA switches its memory and filter on by epoch
        warm = epoch <= t.warmup_epochs  # warm-up: trunk frozen, embedder + proxies train
        for p in trunk_params:
            p.requires_grad_(not warm)
        model.train()
        loss_fn.train()
        diverged = False
        for images, labels in loader:
            images = to_input(images.to(device, non_blocking=True))  # uint8 -> trunk input
            labels = torch.searchsorted(label_map, labels).to(device)
            loss = training_step(step_model, loss_fn, model_opt, loss_opt, images, labels, amp,
                                 t.grad_clip)
            if loss is None:
                diverged = True
                break
        if diverged:
            stop_reason = "diverged"  # keep the best checkpoint from before the divergence
            break

        state["epoch"] = epoch
        if epoch % val_every and epoch != t.max_epochs:
            continue
        try:
            metrics = validate(cfg, model, data, val_idx, device)
        except NonFiniteEmbeddings:
            # A finite loss with non-finite gradients leaves NaN weights: the model diverged.
            stop_reason = "diverged"  # keep the best checkpoint from before the divergence
            break
        state["history"].append({"epoch": epoch, "iteration": epoch * t.iters_per_epoch,
                                 "loss": float(loss.detach()), **metrics})
        if metrics["map_at_r"] > state["best_map"]:
            state.update(best_map=metrics["map_at_r"], best_epoch=epoch, best_metrics=metrics)
            unsaved_best = copy.deepcopy({"model": model.state_dict(),
                                          "loss": loss_fn.state_dict(),
                                          "epoch": epoch, "metrics": metrics})
        epochs.set_postfix(loss=f"{float(loss.detach()):.3f}",
                           map_at_r=f"{metrics['map_at_r']:.4f}",
                           best=f"{state['best_map']:.4f}")
        if time.monotonic() - written >= every:
            write_best()  # first: the checkpoint's state names this best
            ckpt = {"model": model.state_dict(), "loss": loss_fn.state_dict(),
                    "model_opt": model_opt.state_dict(),
                    "loss_opt": loss_opt.state_dict() if loss_opt is not None else None,
                    "state": state}
            _atomic_save(ckpt, last_path)
            written = time.monotonic()
        if report is not None:
            try:
                report(epoch * t.iters_per_epoch, metrics["map_at_r"])
            except Exception:
                write_best()
                write_json_atomic(run_dir / "history.json", state["history"])
                last_path.unlink(missing_ok=True)  # a fold stopped by its caller never resumes
                raise
        if epoch - state["best_epoch"] > patience:
            stop_reason = "patience"
            break
    epochs.close()
    write_best()
    write_json_atomic(run_dir / "history.json", state["history"])
    last_path.unlink(missing_ok=True)  # the fold is finished: only best.pt is worth keeping
    best = state["best_map"]
    return FoldResult(fold=fold.index, best_map_at_r=best if best >= 0 else 0.0,
                      best_metrics=state["best_metrics"], best_epoch=state["best_epoch"],
                      epochs_trained=state["epoch"], history=state["history"],
                      stop_reason=stop_reason,
                      checkpoint=str(best_path) if best_path.exists() else "")


def load_best_model(cfg: StudyConfig, checkpoint: Path, device: torch.device):
    """The fold model saved in best.pt, ready for embedding (no pretrained lookup needed)."""
    # The checkpoint holds every weight: no pretrained file is looked for.
    model = build_model(dataclasses.replace(cfg.model, pretrained=False)).to(device)
    ckpt = load_checkpoint(Path(checkpoint), device)
    try:
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{checkpoint} does not fit the study's model ({str(e)[:300]}). "
                              f"Delete it to retrain that fold.") from None
    return model.eval()


__all__ = ["FoldResult", "train_fold", "validate", "load_best_model", "load_checkpoint",
           "CheckpointError", "seed_everything",
           "get_loss_spec"]
