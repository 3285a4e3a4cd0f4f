"""MLRC conformance, point by point (docs/conformance.md): the default run is MLRC's run.

Each test pins one protocol point against the value in MLRC's own code (powerful-benchmarker
v0.9.33, pml v0.9.92; the file is named in each test). Search spaces per loss and data set are
pinned in tests/test_conformance_spaces.py.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from scipy import stats

from harness.config import StudyConfig, load_study
from harness.datasets import DATASETS
from harness.aggregate import summarize
from harness.final import reproduction_plan
from harness.sampler import MLRC_LIST_LENGTH, MLRCPassSampler
from harness.search import (LOSS_LR_SPACE, SobolThenGPSampler, make_pruner, make_sampler,
                            search_space, startup_trials)
from harness.train import build_fold_modules
from losses.sparse_centers_regularizer import SparseCentersRegularizer

MLRC_STUDIES = ["proxy_anchor_cub", "proxy_nca_cars", "soft_triple_sop", "arcface_cub"]


@pytest.fixture(params=MLRC_STUDIES)
def mlrc_cfg(request) -> StudyConfig:
    return load_study(request.param)


def test_trunk_embedder_batchnorm(mlrc_cfg):
    # pb/configs/config_models/default.yaml: bninception imagenet, MLP [128];
    # pb/configs/config_general/default.yaml: freeze_trunk_batchnorm: True
    m = mlrc_cfg.model
    assert (m.trunk, m.pretrained, m.embedding_size, m.freeze_bn, m.pooling, m.layer_norm) == \
        ("bninception", True, 128, True, "avg", False)


def test_batch_sampler_epochs(mlrc_cfg):
    # pb/configs/config_general/default.yaml: batch_size 32, iterations_per_epoch 100,
    # num_epochs_train 1000; config_loss_and_miners/default.yaml: MPerClassSampler m 4
    t = mlrc_cfg.train
    assert (t.batch_size, t.m_per_class, t.sampler, t.iters_per_epoch, t.max_epochs) == \
        (32, 4, "mlrc", 100, 1000)


def test_optimisers(mlrc_cfg):
    # pb/configs/config_optimizers/default.yaml (trunk, embedder) and
    # with_metric_loss_optimizer_bayes_opt.yaml (loss parameters)
    t = mlrc_cfg.train
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay) == ("rmsprop", 1e-6, 0.9, 1e-4)
    assert (t.loss_optimizer, t.loss_weight_decay) == ("rmsprop", 1e-4)
    assert (t.warmup_epochs, t.grad_clip) == (0, 0.0)
    assert (LOSS_LR_SPACE.low, LOSS_LR_SPACE.high, LOSS_LR_SPACE.log) == (1e-6, 1.0, True)
    assert search_space(mlrc_cfg)["train.loss_lr"] == LOSS_LR_SPACE


def test_optimisers_are_built_as_configured():
    cfg = load_study("proxy_anchor_cub", overrides=["model.trunk=small_cnn",
                                                     "model.pretrained=false"])
    model, loss, model_opt, loss_opt = build_fold_modules(cfg, 10, torch.device("cpu"))
    for opt in (model_opt, loss_opt):
        assert isinstance(opt, torch.optim.RMSprop)
        group = opt.param_groups[0]
        assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)
    assert model_opt.param_groups[0]["lr"] == 1e-6
    assert loss_opt.param_groups[0]["lr"] == cfg.train.loss_lr
    assert {id(p) for p in loss_opt.param_groups[0]["params"]} == \
        {id(p) for p in loss.parameters()}


def test_precision_is_float32(mlrc_cfg):
    # MLRC's trainers (pml v0.9.92 trainers/) never autocast
    assert (mlrc_cfg.train.amp, mlrc_cfg.train.channels_last) == (False, False)


def test_soft_triple_collapse_gradient_is_mlrcs_unless_opted_out():
    """MLRC's SoftTriple (pml 0.9.92's SparseCentersRegularizer under 2020's PyTorch, whose clamp
    had the subgradient 1 at its bound) turns NaN at an exactly collapsed pair of centers:
    "mlrc" by default, in every study and under Proxy Synthesis; the embedded profile opts in to
    torch 2.14's gradient 0 (docs/conformance.md, SoftTriple row)."""
    for name in ("soft_triple_cub", "soft_triple_sop", "proxy_synthesis_soft_triple_cars"):
        cfg = load_study(name, overrides=["model.trunk=small_cnn", "model.pretrained=false",
                                          "loss.reg_weight=0.2"])
        assert cfg.train.center_collapse_gradient == "mlrc"
        _, loss, _, _ = build_fold_modules(cfg, 10, torch.device("cpu"))
        modes = [m.collapse_gradient for m in loss.modules()
                 if isinstance(m, SparseCentersRegularizer)]
        assert modes == ["mlrc"], name
        embedded = load_study(name, profile="embedded")
        assert embedded.train.center_collapse_gradient == "zero"
        _, loss, _, _ = build_fold_modules(embedded, 10, torch.device("cpu"))
        assert [m.collapse_gradient for m in loss.modules()
                if isinstance(m, SparseCentersRegularizer)] == ["zero"], name


def test_transforms(mlrc_cfg):
    # pb/configs/config_transforms/default.yaml
    d = mlrc_cfg.data
    assert (d.resize, d.crop, d.scale_min) == (256, 227, 0.16)


@pytest.mark.parametrize("dataset, every, patience", [("cub200", 2, 9), ("cars196", 5, 14),
                                                      ("sop", 20, 39)])
def test_validation_interval_and_patience(dataset, every, patience):
    # pb/configs/config_general/{default,with_cars196,with_sop}.yaml: save_interval, patience
    spec = DATASETS[dataset]
    assert (spec.val_every_epochs, spec.patience) == (every, patience)


def test_search_defaults(mlrc_cfg):
    # pb/runners/bayes_opt_runner.py: AxClient (Sobol, then GP-EI), 50 trials, no pruning
    s = mlrc_cfg.search
    assert (s.sampler, s.pruner, s.trials, s.folds, s.n_startup_trials) == \
        ("gp", "none", 50, 4, -1)
    assert isinstance(make_pruner(mlrc_cfg), optuna.pruners.NopPruner)
    space = search_space(mlrc_cfg)
    sampler = make_sampler(mlrc_cfg, space)
    assert isinstance(sampler, SobolThenGPSampler)
    # ax-platform 0.1.13 dispatch_utils.choose_generation_strategy: max(5, #parameters)
    assert sampler.n_startup == max(5, len(space)) == startup_trials(mlrc_cfg, len(space))


def test_sobol_start_then_gp():
    cfg = load_study("soft_triple_cub")
    space = search_space(cfg)
    sampler = make_sampler(cfg, space)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    points = []

    def objective(trial):
        from harness.search import suggest
        params = {k: suggest(trial, p, k) for k, p in space.items()}
        points.append(params)
        return float(sum(np.log10(v + 1e-3) for v in params.values() if v > 0))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=sampler.n_startup)
    # The start is the scrambled Sobol sequence of scipy, seeded with the study seed.
    from scipy.stats import qmc
    with pytest.warns(UserWarning):  # scipy: balance needs 2^k points; Ax draws 5 too
        expected = qmc.Sobol(len(space), scramble=True, seed=cfg.seed).random(sampler.n_startup)
    names = list(space)  # the QMC coordinates follow the space's order
    for row, params in zip(expected, points):
        for u, name in zip(row, names):
            p = space[name]
            if p.log:
                value = math.exp(math.log(p.low) + u * (math.log(p.high) - math.log(p.low)))
            else:
                value = p.low + u * (p.high - p.low)
            assert params[name] == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_reported_runs_are_best_trial_plus_ten(mlrc_cfg):
    # bayes_opt_runner.py: test_model(best); reproduce_results (10); create_accuracy_report
    # over the best trial and its reproductions
    plan = reproduction_plan(mlrc_cfg, mlrc_cfg.final.reproductions)
    assert plan[0] == (0, "best_trial")
    assert [r for r, _ in plan] == list(range(11))
    assert {s for _, s in plan[1:]} == {"retrained"}


def test_the_tested_trial_is_the_search_best_by_its_one_run(mlrc_cfg):
    # bayes_opt_runner.py save_best_parameters: the record with max(primary metric), i.e. the
    # trial's 4-fold mean of its one run; rechecking the top trials is an opt-in
    # (harness/recheck.py)
    assert mlrc_cfg.final.recheck_top == 0


def test_interval_is_mlrc_student_t():
    # bayes_opt_runner.py create_accuracy_report:
    # scipy_stats.t.interval(0.95, len(v2)-1, loc=np.mean(v2), scale=scipy_stats.sem(v2))
    rng = np.random.default_rng(0)
    rows = []
    for rep in range(11):
        for fold in range(4):
            rows.append({"reproduction": rep, "mode": "separated", "fold": fold,
                         "map_at_r": rng.uniform(0.2, 0.3)})
        rows.append({"reproduction": rep, "mode": "concatenated", "fold": -1,
                     "map_at_r": rng.uniform(0.2, 0.3)})
    frame = pd.DataFrame(rows)
    table = summarize(frame).set_index(["mode", "metric"])
    for mode in ("separated", "concatenated"):
        per_rep = frame[frame["mode"] == mode].groupby("reproduction")["map_at_r"].mean()
        low, _ = stats.t.interval(0.95, len(per_rep) - 1, loc=per_rep.mean(),
                                  scale=stats.sem(per_rep))
        row = table.loc[(mode, "map_at_r")]
        assert row["n"] == 11
        assert row["mean"] == pytest.approx(per_rep.mean())
        assert row["ci95"] == pytest.approx(per_rep.mean() - low)


# --------------------------------------------------------------------------------------------
# The sampler: MLRC's per-pass behaviour
# --------------------------------------------------------------------------------------------
def _labels(num_classes=75, per_class=30, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    return labels[rng.permutation(len(labels))]  # the sampler must not rely on order


def test_every_class_once_per_pass():
    labels = _labels()
    sampler = MLRCPassSampler(labels, m=4, batch_size=32, batches_per_epoch=100, seed=1)
    stream = []
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        stream += list(sampler)
    pass_len = 75 * 4
    for p in range(len(stream) // pass_len):
        chunk = labels[stream[p * pass_len:(p + 1) * pass_len]]
        counts = collections.Counter(chunk.tolist())
        assert len(counts) == 75 and set(counts.values()) == {4}


def _pml_list(labels, seed: int, k: int, list_length: int = MLRC_LIST_LENGTH) -> list[int]:
    """List k as pml's MPerClassSampler(labels, m=4) draws it whole from list k's NumPy state."""
    pml = MPerClassSampler(labels, 4, length_before_new_iter=list_length)
    pml.labels = sorted(pml.labels)
    saved = pml_common.NUMPY_RANDOM
    pml_common.NUMPY_RANDOM = np.random.RandomState(
        np.random.SeedSequence([seed, k]).generate_state(1)[0])
    try:
        return [int(i) for i in iter(pml)]
    finally:
        pml_common.NUMPY_RANDOM = saved


def test_lists_are_pml_mperclasssampler_lists():
    """The stream is pml's own MPerClassSampler(labels, m=4) without batch_size and with its
    default list length, as MLRC built it: each list equal to what pml returns from the same
    NumPy state."""
    labels = _labels(num_classes=20, per_class=7)
    ours = MLRCPassSampler(labels, m=4, batch_size=32, batches_per_epoch=10, seed=5)
    assert len(MPerClassSampler(labels, 4)) == MLRC_LIST_LENGTH - MLRC_LIST_LENGTH % 80 == \
        len(ours.pml)
    for k in (0, 1):
        assert ours.sampler_list(k) == _pml_list(labels, 5, k)


# per_class 3: classes with fewer than m images (drawn with replacement); list_length 100: one
# pass (120 indices) longer than the list, which pml truncates to one pass
@pytest.mark.parametrize("per_class, list_length", [(3, MLRC_LIST_LENGTH), (7, 1000), (6, 100)])
def test_batches_drawn_pass_by_pass_are_those_of_pmls_whole_list(per_class, list_length):
    labels = _labels(num_classes=30, per_class=per_class)
    ours = MLRCPassSampler(labels, m=4, batch_size=32, batches_per_epoch=2, seed=7,
                           list_length=list_length)
    per_list = ours.batches_per_list * 32  # DataLoader drop_last per list
    stream = []
    for epoch in range(1, 9):
        ours.set_epoch(epoch)
        stream += list(ours)  # draws only the passes these batches need
    lists = range(len(stream) // per_list + 1)
    whole = [i for k in lists for i in _pml_list(labels, 7, k, list_length)[:per_list]]
    assert stream == whole[:len(stream)]
    assert ours.sampler_list(0) == _pml_list(labels, 7, 0, list_length)


def test_epochs_continue_the_stream_and_resume_exactly():
    labels = _labels(num_classes=30, per_class=6)
    a = MLRCPassSampler(labels, m=4, batch_size=32, batches_per_epoch=10, seed=3,
                        list_length=1000)  # 1000 -> 960 = 8 passes, 30 batches per list
    stream = []
    for epoch in range(1, 8):  # crosses several list boundaries
        a.set_epoch(epoch)
        stream.append(list(a))
    b = MLRCPassSampler(labels, m=4, batch_size=32, batches_per_epoch=10, seed=3,
                        list_length=1000)
    b.set_epoch(6)
    assert list(b) == stream[5]  # a resumed fold sees the same batches
    lists = [a.sampler_list(k) for k in range(3)]
    flat = [i for lst in lists for i in lst[: 30 * 32]]  # DataLoader drop_last per list
    assert [i for epoch in stream[:9] for i in epoch] == flat[: 7 * 320]


def test_per_batch_sampler_is_the_opt_in():
    cfg = load_study("proxy_anchor_cub_paper")
    assert cfg.train.sampler == "per_batch"
