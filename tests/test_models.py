"""Embedding models, trunk weights (never downloaded) and input transforms."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from harness.bninception import BNInception
from harness.errors import ConfigError, WeightsError
from harness.config import ModelConfig
from harness.models import TRUNKS, GlobalPool, build_model, find_weights_file
from harness.transforms import build_transforms

# Smallest inputs each trunk takes (BN-Inception needs ~64 px: five stride-2 stages with
# 3x3 ceil-mode pools), kept tiny so the whole file runs in seconds.
INPUT_SIZE = {"bninception": 64, "resnet18": 32, "resnet50": 32, "small_cnn": 32}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails the test: weights must come from local files only."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def model_for(trunk: str, **model) -> torch.nn.Module:
    """build_model for a ModelConfig with this trunk and these fields (the others default)."""
    return build_model(ModelConfig(trunk=trunk, **model))


def images(trunk, batch=2, seed=0):
    size = INPUT_SIZE[trunk]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomise_bn_statistics(net, seed=0):
    """Non-trivial running stats and affine params, so a load that skipped them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))


# -------------------------------------------------------------------------------------------
# Shapes, pooling, LayerNorm
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_every_trunk_embeds(trunk):
    torch.manual_seed(0)
    model = model_for(trunk, pretrained=False, embedding_size=24).eval()
    with torch.no_grad():
        out = model(images(trunk))
        features = model.trunk(images(trunk))
    assert out.shape == (2, 24) and torch.isfinite(out).all()
    assert features.ndim == 4 and features.shape[1] == model.feature_dim
    assert model.feature_dim == TRUNKS[trunk].feature_dim


def test_bninception_at_mlrc_input_size():
    net = BNInception().eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 227, 227)).shape == (1, 1024, 7, 7)


def test_global_pool_variants():
    x = torch.arange(8.0).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    assert GlobalPool("avg")(x).tolist() == [[1.5, 5.5]]
    assert GlobalPool("max")(x).tolist() == [[3.0, 7.0]]
    assert GlobalPool("avgmax")(x).tolist() == [[4.5, 12.5]]
    with pytest.raises(ConfigError, match="pooling"):
        model_for("small_cnn", pretrained=False, pooling="gem")


@pytest.mark.parametrize("pooling", ["avg", "max", "avgmax"])
def test_model_pooling_is_used(pooling):
    model = model_for("small_cnn", pretrained=False, pooling=pooling, embedding_size=8).eval()
    x = images("small_cnn")
    with torch.no_grad():
        expected = model.embedder(GlobalPool(pooling)(model.trunk(x)))
        assert torch.allclose(model(x), expected)


def test_layer_norm_option():
    plain = model_for("small_cnn", pretrained=False)
    assert isinstance(plain.norm, torch.nn.Identity)
    model = model_for("small_cnn", pretrained=False, layer_norm=True).eval()
    assert isinstance(model.norm, torch.nn.LayerNorm)
    assert not model.norm.elementwise_affine and model.norm.normalized_shape == (128,)
    x = images("small_cnn")
    with torch.no_grad():
        pooled = model.pool(model.trunk(x))
        mean, var = pooled.mean(dim=1, keepdim=True), pooled.var(dim=1, unbiased=False,
                                                                  keepdim=True)
        expected = model.embedder((pooled - mean) / torch.sqrt(var + 1e-5))
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_small_cnn_is_small():
    params = sum(p.numel() for p in model_for("small_cnn", pretrained=False).trunk.parameters())
    assert 50_000 <= params <= 300_000


# -------------------------------------------------------------------------------------------
# Frozen BatchNorm
# -------------------------------------------------------------------------------------------
def bn_layers(model):
    return [m for m in model.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def training_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(images("small_cnn", batch=8, seed=1)).pow(2).mean().backward()
    opt.step()


def test_freeze_bn_keeps_statistics_and_trains_affine():
    model = model_for("small_cnn", pretrained=False, freeze_bn=True)
    model.train()
    assert model.training and model.embedder.training
    assert all(not bn.training for bn in bn_layers(model))
    before = [(bn.running_mean.clone(), bn.running_var.clone(), bn.weight.detach().clone())
              for bn in bn_layers(model)]
    training_step(model)
    for bn, (mean, var, weight) in zip(bn_layers(model), before):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
        assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
        assert not torch.equal(bn.weight.detach(), weight)  # affine params do train
    model.eval()
    model.train()  # a second train() call must freeze them again
    assert all(not bn.training for bn in bn_layers(model))


def test_freeze_bn_off_updates_statistics():
    model = model_for("small_cnn", pretrained=False, freeze_bn=False).train()
    assert all(bn.training for bn in bn_layers(model))
    before = bn_layers(model)[0].running_mean.clone()
    training_step(model)
    assert not torch.equal(bn_layers(model)[0].running_mean, before)


def test_freeze_bn_covers_bninception():
    model = model_for("bninception", pretrained=False).train()
    assert len(bn_layers(model)) == 69 and all(not bn.training for bn in bn_layers(model))


# -------------------------------------------------------------------------------------------
# BN-Inception weights
# -------------------------------------------------------------------------------------------
def cadene_style_file(net, path):
    """Save `net` the way bn_inception-52deb4733.pth stores it: the legacy (pre-zip) format,
    BatchNorm tensors as (1, C), no num_batches_tracked (pre-0.4 PyTorch), plus the ImageNet
    classifier `last_linear`."""
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        state[key] = value.unsqueeze(0) if "_bn." in key else value
    state["last_linear.weight"] = torch.randn(1000, 1024)
    state["last_linear.bias"] = torch.randn(1000)
    torch.save(state, path, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("style", ["cadene", "plain"])
def test_bninception_weights_round_trip(tmp_path, style):
    torch.manual_seed(0)
    source = BNInception().eval()
    randomise_bn_statistics(source)
    path = tmp_path / "bn_inception.pth"
    if style == "cadene":
        cadene_style_file(source, path)
    else:
        torch.save(source.state_dict(), path)
    model = model_for("bninception", weights=str(path)).eval()
    x = images("bninception")
    with torch.no_grad():
        assert torch.equal(model.trunk(x), source(x))


def test_bninception_found_in_torch_hub_cache(empty_torch_home):
    source = BNInception()
    randomise_bn_statistics(source, seed=3)
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    cadene_style_file(source, cache / "bn_inception-52deb4733.pth")
    model = model_for("bninception")
    assert torch.equal(model.trunk.inception_5b_pool_proj_bn.running_var,
                       source.inception_5b_pool_proj_bn.running_var)


def test_wrong_file_names_the_keys(tmp_path):
    state = BNInception().state_dict()
    state["renamed_conv.weight"] = state.pop("inception_4a_1x1.weight")
    state["inception_5a_3x3.bias"] = torch.zeros(7)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        model_for("bninception", weights=str(path))
    message = str(err.value)
    assert "missing keys: inception_4a_1x1.weight" in message
    assert "unexpected keys: renamed_conv.weight" in message
    assert "inception_5a_3x3.bias (7,) vs (320,)" in message


def test_other_architecture_file_is_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match=r"missing keys: conv1_7x7_s2\.weight.*more"):
        model_for("bninception", weights=str(path))


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="not a readable torch weight file"):
        model_for("bninception", weights=str(path))


def test_missing_weights_path(tmp_path):
    with pytest.raises(WeightsError, match="no such file.*model.pretrained=false"):
        model_for("bninception", weights=str(tmp_path / "absent.pth"))


def test_pretrained_without_file_says_what_to_do(empty_torch_home):
    with pytest.raises(WeightsError) as err:
        model_for("bninception")
    message = str(err.value)
    assert "bn_inception-52deb4733.pth" in message  # the file looked for / to get
    assert str(empty_torch_home) in message  # where it was looked for
    assert "--set model.pretrained=false" in message


def test_small_cnn_weights_are_built_not_looked_up(empty_torch_home, tiny_glyph_trunk):
    # No file in the torch hub cache is needed: the glyph trunk is built (tests: a tiny one).
    model = model_for("small_cnn", pretrained=True)
    state = torch.load(find_weights_file("small_cnn"), weights_only=True)
    assert torch.equal(model.trunk.state_dict()["features.0.weight"], state["features.0.weight"])
    assert find_weights_file("small_cnn").parent == tiny_glyph_trunk


def test_unknown_trunk():
    with pytest.raises(ConfigError, match="resnet18"):
        model_for("vgg16", pretrained=False)


# -------------------------------------------------------------------------------------------
# ResNet weights from a fake torch hub cache
# -------------------------------------------------------------------------------------------
def test_resnet_weights_from_torch_hub_cache(empty_torch_home):
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    randomise_bn_statistics(source, seed=1)
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / "resnet18-f37072fd.pth")  # with fc, as torchvision's
    model = model_for("resnet18").eval()
    source.eval()
    x = images("resnet18")
    with torch.no_grad():
        expected = source.layer4(source.layer3(source.layer2(source.layer1(
            source.maxpool(source.relu(source.bn1(source.conv1(x))))))))
        assert torch.equal(model.trunk(x), expected)


def test_resnet_without_file(empty_torch_home):
    with pytest.raises(WeightsError, match="resnet50-0676ba61.pth.*model.pretrained=false"):
        model_for("resnet50")


# -------------------------------------------------------------------------------------------
# Transforms
# -------------------------------------------------------------------------------------------
def solid_image(rgb, size=(40, 30)):
    return Image.fromarray(np.full((size[1], size[0], 3), rgb, dtype=np.uint8))


def test_bninception_input_is_bgr_255_minus_mean():
    x = build_transforms("bninception", resize=32, crop=28, train=False)(solid_image((10, 20, 30)))
    assert x.shape == (3, 28, 28)
    # channel 0 = blue 30 - 104, channel 1 = green 20 - 117, channel 2 = red 10 - 128
    assert torch.allclose(x[:, 0, 0], torch.tensor([30 - 104.0, 20 - 117.0, 10 - 128.0]),
                          atol=1e-4)


def test_resnet_and_small_cnn_normalisation():
    img = solid_image((255, 0, 128))
    x = build_transforms("resnet50", resize=32, crop=28, train=False)(img)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor([0.485, 0.456, 0.406])) \
        / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[:, 0, 0], expected, atol=1e-4)
    y = build_transforms("small_cnn", resize=36, crop=32, train=False)(img)
    assert y.shape == (3, 32, 32)
    assert torch.allclose(y[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-4)


def test_grayscale_becomes_three_channels():
    gray = Image.fromarray(np.full((30, 40), 77, dtype=np.uint8))
    assert build_transforms("resnet18", resize=32, crop=28, train=True)(gray).shape == (3, 28, 28)


def has_flip(transform):
    return any(type(t).__name__ == "RandomHorizontalFlip" for t in transform.transforms)


def test_flip_defaults_and_override():
    assert has_flip(build_transforms("bninception"))
    assert not has_flip(build_transforms("small_cnn", resize=36, crop=32))  # glyphs: no mirror
    assert has_flip(build_transforms("small_cnn", resize=36, crop=32, hflip=True))
    assert not has_flip(build_transforms("resnet50", hflip=False))
    assert not has_flip(build_transforms("bninception", train=False))


def test_eval_transform_is_deterministic_and_train_is_not():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8))
    ev = build_transforms("resnet18", resize=40, crop=32, train=False)
    assert torch.equal(ev(img), ev(img))
    tr = build_transforms("resnet18", resize=40, crop=32, train=True)
    torch.manual_seed(0)
    outs = [tr(img) for _ in range(4)]
    assert outs[0].shape == (3, 32, 32)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_unknown_trunk_transform():
    with pytest.raises(ConfigError, match="trunk"):
        build_transforms("vgg16")


# -------------------------------------------------------------------------------------------
# Frozen trunk blocks (model.frozen_blocks; the embedded profile fine-tunes the last block)
# -------------------------------------------------------------------------------------------
def block_parameters(model, block):
    """small_cnn's block `block` (0-based): its conv and BatchNorm parameters."""
    return list(model.trunk.features[3 * block:3 * block + 3].parameters())


@pytest.mark.parametrize("frozen", [1, 2, 3, 4])
def test_frozen_blocks_stay_as_they_were_and_the_rest_trains(frozen):
    """freeze_bn off, so that a frozen block's BatchNorm keeping its statistics is the freeze's
    doing; the optimiser gets every parameter, so that a frozen one unchanged is not merely one
    left out of it."""
    model = model_for("small_cnn", pretrained=False, freeze_bn=False, frozen_blocks=frozen)
    randomise_bn_statistics(model.trunk)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training_step(model)
    after = model.state_dict()
    frozen_keys = {k for k in before if k.startswith("trunk.features.")
                   and int(k.split(".")[2]) < 3 * frozen}
    assert frozen_keys and all(torch.equal(after[k], before[k]) for k in frozen_keys)
    assert all(p.grad is None and not p.requires_grad
               for b in range(frozen) for p in block_parameters(model, b))
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert "embedder.weight" in changed
    for b in range(frozen, 4):  # the blocks after the frozen ones: weights and statistics
        assert {f"trunk.features.{3 * b}.weight", f"trunk.features.{3 * b + 1}.running_mean",
                f"trunk.features.{3 * b + 1}.bias"} <= changed


def test_frozen_blocks_compute_what_the_trunk_computes():
    """Freezing changes what trains, not the function: the same weights embed alike, and the
    state dict keeps its keys (checkpoints of either load into the other)."""
    whole = model_for("small_cnn", pretrained=False)
    randomise_bn_statistics(whole.trunk)
    frozen = model_for("small_cnn", pretrained=False, frozen_blocks=3)
    frozen.load_state_dict(whole.state_dict())
    x = images("small_cnn", batch=4)
    for mode in (True, False):  # freeze_bn: BatchNorm in eval mode in both
        whole.train(mode)
        frozen.train(mode)
        assert torch.equal(whole(x), frozen(x))
    assert list(frozen.state_dict()) == list(whole.state_dict())


def test_the_optimiser_and_the_warm_up_leave_frozen_blocks_out():
    """harness.train gives the optimiser what trains; a warm-up that unfreezes the trunk after
    its epochs must not unfreeze the frozen blocks (it toggles the trainable ones only)."""
    from harness.config import load_study
    from harness.train import build_fold_modules, trainable

    cfg = load_study("proxy_anchor_glyphs", profile="embedded")
    cfg.model.pretrained = False
    model, _, model_opt, _ = build_fold_modules(cfg, num_classes=8, device=torch.device("cpu"))
    optimised = {id(p) for group in model_opt.param_groups for p in group["params"]}
    frozen = {id(p) for b in range(3) for p in block_parameters(model, b)}
    assert cfg.model.frozen_blocks == 3 and frozen and not optimised & frozen
    assert optimised == {id(p) for p in trainable(model)}
    assert {id(p) for p in block_parameters(model, 3)} <= optimised


@pytest.mark.parametrize("trunk, count, message", [
    ("small_cnn", 5, "between 0 .* and 4"),
    ("small_cnn", -1, "between 0"),
    ("resnet18", 1, "'resnet18' has no frozen-block option"),
    ("bninception", 2, "'bninception' has no frozen-block option"),
])
def test_frozen_blocks_a_trunk_cannot_freeze_is_a_clear_error(trunk, count, message):
    with pytest.raises(ConfigError, match=message):
        model_for(trunk, pretrained=False, frozen_blocks=count)
