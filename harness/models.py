"""Embedding models: trunk -> global pooling -> (LayerNorm) -> Linear embedder.

MLRC's model is BN-Inception with ImageNet weights, its classifier removed (1024-d average-pooled
features), its BatchNorm layers frozen (eval mode; affine parameters still train), and one
Linear(1024 -> 128) embedder without ReLU. The output is NOT L2-normalised: the losses and
`harness.metrics` normalise where they need to.

Trunks (registry `TRUNKS`):
  * "bninception": harness.bninception, weights `bn_inception-52deb4733.pth` (Cadene).
  * "resnet18", "resnet50": torchvision architectures without avgpool/fc, torchvision's
    IMAGENET1K_V1 weight files.
  * "small_cnn": four conv-BN-ReLU blocks for 32x32 images (the embedded glyph data set of the
    quickstart); ~98k parameters. Its "ImageNet weights" are built, not downloaded: with
    pretrained=True and no `weights`, harness.glyph_trunk pretrains it on glyph classes disjoint
    from the benchmark's (cached; built on first use in about 40 s on 2 CPU cores).

Pretrained weights are NEVER downloaded: they come from `weights` (a local path) or, failing
that, from the torch hub cache (`torch.hub.get_dir()/checkpoints/<file name>`, i.e.
$TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints). No file, or a file that
does not fit the trunk, is a WeightsError saying what was looked for and what did not match.
With pretrained=False the trunk is randomly initialised and `weights` is ignored.

The embedder keeps nn.Linear's default initialisation (as MLRC's powerful-benchmarker does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from harness.bninception import BNInception, adapt_cadene_state_dict
from harness.config import ModelConfig
from harness.errors import ConfigError, WeightsError

POOLINGS = ("avg", "max", "avgmax")
SHOWN_KEYS = 5  # how many offending keys an error message lists


# --------------------------------------------------------------------------------------------
# Trunks
# --------------------------------------------------------------------------------------------


class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to layer4: (B, 3, H, W) -> (B, C, H/32, W/32).

    The children keep torchvision's names (conv1, bn1, layer1, ...), so torchvision's weight
    files load key for key once their `fc.*` entries are dropped."""

    def __init__(self, resnet: torchvision.models.ResNet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = (resnet.conv1, resnet.bn1, resnet.relu,
                                                         resnet.maxpool)
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.feature_dim = resnet.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SmallCNN(nn.Module):
    """Four stride-2 conv-BN-ReLU blocks, 3 -> 16 -> 32 -> 64 -> 128 channels.

    Built for 32x32 glyphs (-> a 2x2 map). Stride-2 convolutions instead of conv + max-pool:
    half the CPU time for the same width. Widths are multiples of 16 (SIMD-friendly): measured
    on 1 CPU thread, a training step at batch 32 takes 13.5 ms here against 26.6 ms for the
    earlier 24-48-96-192 and 30.2 ms for 32-64-128-256, which is what lets the embedded
    benchmark run every method to convergence on a laptop."""

    WIDTHS = (16, 32, 64, 128)
    LAYERS_PER_BLOCK = 3  # conv, BN, ReLU

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for c_out in self.WIDTHS:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.frozen_blocks = 0

    def freeze_first_blocks(self, count: int) -> None:
        """Keep the first `count` blocks as they are (model.frozen_blocks): no gradient is
        computed for them (their forward runs under no_grad, which is what saves the time), their
        parameters leave the optimiser (requires_grad False) and their BatchNorm statistics
        never update, whatever freeze_bn says. The state dict keeps its keys."""
        blocks = len(self.WIDTHS)
        if not 0 <= count <= blocks:
            raise ConfigError(f"model.frozen_blocks must be between 0 (the whole trunk is "
                              f"fine-tuned, as MLRC) and {blocks} (small_cnn's {blocks} conv "
                              f"blocks, all frozen), got {count}")
        self.frozen_blocks = count
        for p in self.frozen_part().parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def frozen_part(self) -> nn.Sequential:
        """The frozen blocks' layers (empty when none is frozen)."""
        return self.features[:self._frozen_layers()]

    def _frozen_layers(self) -> int:
        return self.LAYERS_PER_BLOCK * self.frozen_blocks

    def train(self, mode: bool = True) -> SmallCNN:
        super().train(mode)
        self.frozen_part().eval()  # a frozen block's BatchNorm statistics never update
        return self

    def frozen_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen blocks' output (the input itself when none is frozen), without a graph."""
        cut = self._frozen_layers()
        if not cut:
            return x
        with torch.no_grad():
            return self.features[:cut](x)

    def trainable_suffix(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks after the frozen ones, from the frozen blocks' output (the
        model.cache_frozen_features path starts here: harness/frozen_features.py)."""
        return self.features[self._frozen_layers():](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainable_suffix(self.frozen_prefix(x))


def _drop_classifier(prefix: str) -> Callable[[dict, dict], dict]:
    def adapt(state: dict, expected: dict) -> dict:
        return {k: v for k, v in state.items() if not k.startswith(prefix)}
    return adapt


@dataclass(frozen=True)
class InputNorm:
    """The input a trunk expects (harness.transforms applies it)."""

    bgr_255: bool  # reorder to BGR and scale to 0-255 before mean/std (Caffe-ported weights)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool  # default for training-time horizontal flips


IMAGENET = InputNorm(bgr_255=False, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     hflip=True)


@dataclass(frozen=True)
class TrunkSpec:
    """How to build a trunk, what input it expects and where its pretrained weights come from."""

    build: Callable[[], nn.Module]
    feature_dim: int
    input_norm: InputNorm
    weight_files: tuple[str, ...]  # file names looked for in the torch hub cache, in order
    weight_source: str  # where a user gets the file (for error messages)
    adapt_state_dict: Callable[[dict, dict], dict]  # (file's state dict, trunk's) -> loadable
    # Weights the harness makes itself (the glyph trunk), used when no file is given.
    build_weights: Callable[[], Path] | None = None


TRUNKS: dict[str, TrunkSpec] = {
    "bninception": TrunkSpec(
        build=BNInception, feature_dim=1024,
        # The Caffe convention of the ported weights: BGR, 0-255, minus the channel means.
        input_norm=InputNorm(bgr_255=True, mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0),
                             hflip=True),
        # 52deb4733: the file MLRC, Proxy Anchor and pretrainedmodels 0.7.4 use;
        # 239d2248: the name in Cadene's current repository (same architecture).
        weight_files=("bn_inception-52deb4733.pth", "bn_inception-239d2248.pth"),
        weight_source="http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth "
                      "(Cadene's pretrainedmodels package)",
        adapt_state_dict=adapt_cadene_state_dict),
    "resnet18": TrunkSpec(
        build=lambda: ResNetTrunk(torchvision.models.resnet18(weights=None)), feature_dim=512,
        input_norm=IMAGENET, weight_files=("resnet18-f37072fd.pth",),
        weight_source="https://download.pytorch.org/models/resnet18-f37072fd.pth "
                      "(torchvision ResNet18_Weights.IMAGENET1K_V1)",
        adapt_state_dict=_drop_classifier("fc.")),
    "resnet50": TrunkSpec(
        build=lambda: ResNetTrunk(torchvision.models.resnet50(weights=None)), feature_dim=2048,
        input_norm=IMAGENET, weight_files=("resnet50-0676ba61.pth",),
        weight_source="https://download.pytorch.org/models/resnet50-0676ba61.pth "
                      "(torchvision ResNet50_Weights.IMAGENET1K_V1)",
        adapt_state_dict=_drop_classifier("fc.")),
    "small_cnn": TrunkSpec(
        build=SmallCNN, feature_dim=SmallCNN.WIDTHS[-1],
        # Random init, so just centred. No flips: the glyphs are characters, and a mirrored
        # character is another character (or none).
        input_norm=InputNorm(bgr_255=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                             hflip=False),
        weight_files=(),
        weight_source="", adapt_state_dict=lambda state, expected: state,
        build_weights=lambda: _glyph_trunk_file()),
}


def _glyph_trunk_file() -> Path:
    from harness.glyph_trunk import pretrained_trunk_file  # renders and trains on first use

    return pretrained_trunk_file()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class GlobalPool(nn.Module):
    """(B, C, H, W) -> (B, C). "avgmax" = average + max summed (Proxy Anchor's GAP + GMP)."""

    def __init__(self, mode: str = "avg"):
        super().__init__()
        if mode not in POOLINGS:
            raise ConfigError(f"model.pooling {mode!r}: expected one of {', '.join(POOLINGS)}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class EmbeddingModel(nn.Module):
    """trunk -> pool -> norm -> embedder; forward returns (B, embedding_size), unnormalised.

    With freeze_bn, every BatchNorm of the trunk stays in eval mode even after .train(): it
    normalises with its (ImageNet) running statistics and never updates them, while its affine
    weight and bias still receive gradients (MLRC). Small DML batches (32 images of 8 classes)
    would otherwise give noisy batch statistics and drift the pretrained ones."""

    def __init__(self, trunk: nn.Module, feature_dim: int, pooling: str = "avg",
                 layer_norm: bool = False, embedding_size: int = 128, freeze_bn: bool = True):
        super().__init__()
        self.trunk = trunk
        self.pool = GlobalPool(pooling)
        # LayerNorm without affine parameters before the embedder: the ProxyNCA++ recipe.
        self.norm = (nn.LayerNorm(feature_dim, elementwise_affine=False) if layer_norm
                     else nn.Identity())
        self.embedder = nn.Linear(feature_dim, embedding_size)
        self.feature_dim = feature_dim
        self.freeze_bn = freeze_bn
        self.train()  # puts frozen BatchNorms in eval mode from the start

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if self.freeze_bn:
            for module in self.trunk.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def head(self, trunk_output: torch.Tensor) -> torch.Tensor:
        """pool -> norm -> embedder, from the trunk's output."""
        return self.embedder(self.norm(self.pool(trunk_output)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def build_model(model: ModelConfig) -> EmbeddingModel:
    """The EmbeddingModel `model` describes; see the module docstring for the weights rules
    (with model.pretrained false, no weight file is looked for)."""
    spec = _trunk_spec(model.trunk)
    if model.embedding_size < 1:
        raise ConfigError(f"model.embedding_size must be >= 1, got {model.embedding_size}")
    net = spec.build()
    if model.pretrained:
        load_trunk_weights(net, model.trunk, model.weights)
    if model.frozen_blocks:
        if not hasattr(net, "freeze_first_blocks"):
            raise ConfigError(f"model.frozen_blocks = {model.frozen_blocks}: trunk "
                              f"{model.trunk!r} has no frozen-block option (small_cnn has); "
                              f"set model.frozen_blocks = 0 to fine-tune the whole trunk, as "
                              f"MLRC does")
        net.freeze_first_blocks(model.frozen_blocks)
    return EmbeddingModel(net, spec.feature_dim, pooling=model.pooling,
                          layer_norm=model.layer_norm, embedding_size=model.embedding_size,
                          freeze_bn=model.freeze_bn)


def input_norm(trunk: str) -> InputNorm:
    """The input normalisation of a registered trunk (ConfigError for another name)."""
    return _trunk_spec(trunk).input_norm


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def load_trunk_weights(net: nn.Module, trunk: str, weights: str = "") -> Path:
    """Load pretrained weights into `net`; returns the file used. Never downloads."""
    spec = _trunk_spec(trunk)
    path = find_weights_file(trunk, weights)
    state = read_state_dict(path)
    expected = net.state_dict()
    state = spec.adapt_state_dict(state, expected)
    _check_fit(state, expected, path, trunk)
    net.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    return path


def find_weights_file(trunk: str, weights: str = "") -> Path:
    """`weights` if given (it must exist), else the first of the trunk's files in the torch hub
    cache, or the weights the trunk builds itself (small_cnn: the glyph trunk). WeightsError (or
    ConfigError for a trunk without any) when there is none."""
    spec = _trunk_spec(trunk)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"model.weights = {weights!r}: no such file. "
                               f"{_how_to_get(spec)}")
        return path
    if spec.build_weights is not None:
        return spec.build_weights()
    if not spec.weight_files:
        raise ConfigError(f"trunk {trunk!r} has no published pretrained weights: set "
                          f"model.weights to your own file, or --set model.pretrained=false")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in spec.weight_files:
        if (cache / name).is_file():
            return cache / name
    looked = ", ".join(str(cache / name) for name in spec.weight_files)
    raise WeightsError(f"pretrained weights for trunk {trunk!r} not found; looked for {looked} "
                       f"(model.weights is empty, and nothing is downloaded). "
                       f"{_how_to_get(spec)}")


def _how_to_get(spec: TrunkSpec) -> str:
    source = f"Get the file from {spec.weight_source} and " if spec.weight_source else ""
    return (f"{source}give its path with --set model.weights=PATH (or put it in the torch hub "
            f"cache), or --set model.pretrained=false to train from random initialisation.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a weight file is data; never run the code a pickle could carry.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / non-torch files
        raise WeightsError(f"{path}: not a readable torch weight file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint rather than a bare state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict (parameter name -> tensor), got "
                           f"{type(state).__name__}")
    return dict(state)


def _check_fit(state: dict, expected: dict, path: Path, trunk: str) -> None:
    """WeightsError naming the first few missing, unexpected and mis-shaped keys, if any.

    Missing `num_batches_tracked` buffers are fine: files saved before PyTorch 0.4 (the
    BN-Inception one) have none, and they only count BatchNorm updates."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in state if k in expected and state[k].shape != expected[k].shape]
    if not (missing or unexpected or mis_shaped):
        return
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches (file vs trunk)", mis_shaped)):
        if keys:
            more = f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:SHOWN_KEYS])}{more}")
    raise WeightsError(f"{path} does not fit trunk {trunk!r}: " + "; ".join(parts))


def _trunk_spec(trunk: str) -> TrunkSpec:
    if trunk not in TRUNKS:
        raise ConfigError(f"model.trunk {trunk!r}: expected one of {', '.join(TRUNKS)}")
    return TRUNKS[trunk]
