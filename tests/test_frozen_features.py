"""model.cache_frozen_features: the frozen blocks' output computed once per image
(harness/frozen_features.py) trains and validates as the whole trunk on images does."""

import dataclasses

import pytest
import torch

from harness.config import load_study
from harness.data import (batch_transform, eval_loader, fold_indices, make_train_sampler,
                          prepare_data, train_loader)
from harness.errors import ConfigError
from harness.frozen_features import FromFrozenFeatures, TrainBatches, frozen_features
from harness.train import build_fold_modules, train_fold, validate
from tests.conftest import write_study

CPU = torch.device("cpu")
CACHED = ["data.random_crop=false", "model.frozen_blocks=3", "model.cache_frozen_features=true"]


@pytest.fixture(scope="module")
def study(glyph_root, tmp_path_factory):
    return write_study(tmp_path_factory.mktemp("study"), glyph_root, iters=4)


def config(study, *overrides):
    return load_study(str(study), overrides=[*CACHED, *overrides])


@pytest.fixture(scope="module")
def data(study):
    return prepare_data(config(study))


def uncached(cfg):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                              cache_frozen_features=False))


def test_the_cached_batches_are_the_image_loaders_batches_through_the_frozen_blocks(study,
                                                                                     data):
    cfg = config(study)
    model, *_ = build_fold_modules(cfg, num_classes=8, device=CPU)
    train_idx, _ = fold_indices(data, data.split.folds[0])
    loader, sampler = train_loader(cfg, data, train_idx, seed=3, device=CPU)
    labels = data.records.labels[train_idx]
    cached = TrainBatches(frozen_features(cfg, model, data, CPU, amp=False), train_idx, labels,
                          make_train_sampler(cfg, labels, seed=3), cfg.train.batch_size)
    to_input = batch_transform(cfg, CPU, train=True)
    model.eval()
    pairs = list(zip(loader, cached, strict=True))
    assert len(pairs) == cfg.train.iters_per_epoch
    for (images, image_labels), (features, feature_labels) in pairs:
        assert torch.equal(torch.as_tensor(image_labels), feature_labels)
        torch.testing.assert_close(features, model.trunk.frozen_prefix(to_input(images)),
                                   rtol=1e-5, atol=1e-5)


def test_the_cached_model_embeds_as_the_model_on_images_and_validates_alike(study, data):
    cfg = config(study)
    model, *_ = build_fold_modules(cfg, num_classes=8, device=CPU)
    _, val_idx = fold_indices(data, data.split.folds[1])
    features = frozen_features(cfg, model, data, CPU, amp=False)
    images, _ = next(iter(eval_loader(cfg, data, val_idx[:8], CPU)))
    images = batch_transform(cfg, CPU, train=False)(images)
    model.eval()
    torch.testing.assert_close(FromFrozenFeatures(model)(features[val_idx[:8]]), model(images),
                               rtol=1e-5, atol=1e-5)
    on_features = validate(cfg, model, data, val_idx, CPU)
    on_images = validate(uncached(cfg), model, data, val_idx, CPU)
    assert on_features.keys() == on_images.keys()
    for name in on_images:
        assert on_features[name] == pytest.approx(on_images[name], abs=1e-6), name


def test_a_cached_fold_trains_as_the_fold_on_images(study, data, tmp_path):
    """The same sampler batches, the same steps: the losses and validation curves agree up to
    the last bits of the frozen blocks' output (computed in other batch sizes)."""
    cfg = config(study, "train.max_epochs=3")
    fold = data.split.folds[2]
    data.frozen_features.clear()
    on_features = train_fold(cfg, data, fold, CPU, seed=5, run_dir=tmp_path / "cached")
    assert len(data.frozen_features) == 1  # it did run on the cache
    data.frozen_features.clear()
    on_images = train_fold(uncached(cfg), data, fold, CPU, seed=5, run_dir=tmp_path / "images")
    assert not data.frozen_features  # and this one on images
    assert len(on_features.history) == len(on_images.history) == 3
    for a, b in zip(on_features.history, on_images.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["map_at_r"] == pytest.approx(b["map_at_r"], abs=1e-3)
    assert on_features.best_epoch == on_images.best_epoch


def test_the_cache_is_computed_once_and_only_for_the_frozen_weights_that_made_it(study):
    cfg = config(study)
    data = prepare_data(cfg)
    model, *_ = build_fold_modules(cfg, num_classes=8, device=CPU)
    first = frozen_features(cfg, model, data, CPU, amp=False)
    assert len(first) == len(data.records.labels)
    again, *_ = build_fold_modules(cfg, num_classes=8, device=CPU)
    again.load_state_dict(model.state_dict())  # another fold's model, the same frozen blocks
    assert frozen_features(cfg, again, data, CPU, amp=False) is first

    with torch.no_grad():  # a checkpoint whose frozen blocks differ: their own features
        again.trunk.features[0].weight.mul_(2.0)
    other = frozen_features(cfg, again, data, CPU, amp=False)
    assert other is not first and not torch.allclose(other, first)
    assert len(data.frozen_features) == 1  # one set of frozen weights kept at a time
    with torch.no_grad():  # a frozen BatchNorm's statistics count too
        model.trunk.features[1].running_mean.add_(1.0)
    assert not torch.allclose(frozen_features(cfg, model, data, CPU, amp=False), first)


@pytest.mark.parametrize("overrides, message", [
    (["model.frozen_blocks=0"], "no block is frozen"),
    (["data.random_crop=true"], "data.random_crop is true"),
    (["model.trunk=resnet18", "model.frozen_blocks=1"], "randomly flipped"),
])
def test_a_cache_that_would_not_hold_the_training_input_is_a_clear_error(study, overrides,
                                                                          message):
    with pytest.raises(ConfigError, match=f"model.cache_frozen_features = true: .*{message}"):
        config(study, *overrides)



@pytest.mark.parametrize("training", [True, False])
def test_validating_on_the_cache_leaves_the_model_in_its_mode(study, data, training):
    """As on images (compute_embeddings puts back the model's mode): the wrapper that feeds
    the cache must not turn an eval-mode model into a training one, or the reverse."""
    cfg = config(study)
    model, *_ = build_fold_modules(cfg, num_classes=8, device=CPU)
    model.train(training)
    _, val_idx = fold_indices(data, data.split.folds[0])
    validate(cfg, model, data, val_idx, CPU)
    assert model.training is training and model.embedder.training is training
    assert not model.trunk.features[0].training  # a frozen block stays in eval mode
