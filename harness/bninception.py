"""BN-Inception (Inception v2 with Batch Normalization; Ioffe & Szegedy, ICML 2015), as a trunk.

The MLRC trunk. Its ImageNet weights in deep metric learning come from one file, the Caffe port
`bn_inception-52deb4733.pth` of Cadene's `pretrainedmodels` package (used by MLRC and Proxy
Anchor). To load that file with strict key matching, this module keeps that port's layout:
every convolution and BatchNorm is a direct child of the network, named like
`inception_3a_double_3x3_reduce` (conv, with bias) and `inception_3a_double_3x3_reduce_bn`.
The layer table below (`STEM`, `BLOCKS`) is the whole architecture; modules are created from it.

Differences from that port, none of which changes a state-dict key:
  * no classifier (`last_linear`) and no fixed 7x7 average pool: the trunk returns the
    1024-channel feature map of inception_5b; the embedding model pools it adaptively, so any
    input from about 64x64 up works (227x227 gives a 7x7 map, as in MLRC).
  * BatchNorm momentum is PyTorch's default 0.1. The port wrote Caffe's 0.9, which in PyTorch
    means "90% new batch statistics" (a porting slip); it only matters with freeze_bn=False.
  * ReLUs are not in place, and each branch is conv -> BN -> ReLU (what the port computes).

Input: BGR, range 0-255, minus mean [104, 117, 128] per channel, std 1 (harness.transforms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FEATURE_DIM = 1024

# Stem: (name, in, out, kernel, stride, padding); max pools (3x3, stride 2, ceil) after conv1
# and after conv2_3x3.
STEM = (
    ("conv1_7x7_s2", 3, 64, 7, 2, 3),
    ("conv2_3x3_reduce", 64, 64, 1, 1, 0),
    ("conv2_3x3", 64, 192, 3, 1, 1),
)


@dataclass(frozen=True)
class InceptionBlock:
    """One inception module: up to four parallel branches, concatenated in this order:
    1x1 | 3x3_reduce -> 3x3 | double_3x3_reduce -> 3x3 -> 3x3 | pool (-> pool_proj 1x1).
    Reduction blocks (3c, 4e) have stride 2, no 1x1 branch and no pool projection."""

    name: str
    in_channels: int
    one_by_one: int  # 0 = no 1x1 branch
    reduce_3x3: int
    out_3x3: int
    reduce_double: int
    out_double: int
    pool: str  # "avg" | "max"
    pool_proj: int  # 0 = pooled input passes through unprojected
    stride: int = 1

    @property
    def out_channels(self) -> int:
        pooled = self.pool_proj or self.in_channels
        return self.one_by_one + self.out_3x3 + self.out_double + pooled


BLOCKS = (
    InceptionBlock("inception_3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    InceptionBlock("inception_3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    InceptionBlock("inception_3c", 320, 0, 128, 160, 64, 96, "max", 0, stride=2),
    InceptionBlock("inception_4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    InceptionBlock("inception_4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    InceptionBlock("inception_4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    InceptionBlock("inception_4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    InceptionBlock("inception_4e", 608, 0, 128, 192, 192, 256, "max", 0, stride=2),
    InceptionBlock("inception_5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    InceptionBlock("inception_5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)


class BNInception(nn.Module):
    """BN-Inception trunk: (B, 3, H, W) -> (B, 1024, H/32, W/32) feature map (after ReLU)."""

    feature_dim = FEATURE_DIM

    def __init__(self):
        super().__init__()
        for name, c_in, c_out, kernel, stride, padding in STEM:
            self._add_conv_bn(name, c_in, c_out, kernel, stride, padding)
        self.stem_pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # no parameters: no key
        for block in BLOCKS:
            self._add_block(block)
        self._check_layout()

    # -- construction -----------------------------------------------------------------------

    def _add_conv_bn(self, name: str, c_in: int, c_out: int, kernel: int, stride: int = 1,
                     padding: int = 0) -> None:
        self.add_module(name, nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding))
        self.add_module(f"{name}_bn", nn.BatchNorm2d(c_out, eps=1e-5))

    def _add_block(self, b: InceptionBlock) -> None:
        n = b.name
        if b.one_by_one:
            self._add_conv_bn(f"{n}_1x1", b.in_channels, b.one_by_one, 1)
        self._add_conv_bn(f"{n}_3x3_reduce", b.in_channels, b.reduce_3x3, 1)
        self._add_conv_bn(f"{n}_3x3", b.reduce_3x3, b.out_3x3, 3, b.stride, 1)
        self._add_conv_bn(f"{n}_double_3x3_reduce", b.in_channels, b.reduce_double, 1)
        self._add_conv_bn(f"{n}_double_3x3_1", b.reduce_double, b.out_double, 3, 1, 1)
        self._add_conv_bn(f"{n}_double_3x3_2", b.out_double, b.out_double, 3, b.stride, 1)
        self.add_module(f"{n}_pool", _block_pool(b))
        if b.pool_proj:
            self._add_conv_bn(f"{n}_pool_proj", b.in_channels, b.pool_proj, 1)

    @staticmethod
    def _check_layout() -> None:
        """Each block's input width is the previous block's output width (a table typo guard)."""
        width = STEM[-1][2]
        for b in BLOCKS:
            assert b.in_channels == width, f"{b.name}: input {b.in_channels}, previous {width}"
            width = b.out_channels
        assert width == FEATURE_DIM

    # -- forward ----------------------------------------------------------------------------

    def _conv_bn_relu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, f"{name}_bn")(getattr(self, name)(x))
        return torch.relu(x)

    def _block(self, b: InceptionBlock, x: torch.Tensor) -> torch.Tensor:
        n = b.name
        branches = []
        if b.one_by_one:
            branches.append(self._conv_bn_relu(f"{n}_1x1", x))
        branches.append(self._conv_bn_relu(f"{n}_3x3", self._conv_bn_relu(f"{n}_3x3_reduce", x)))
        double = self._conv_bn_relu(f"{n}_double_3x3_reduce", x)
        double = self._conv_bn_relu(f"{n}_double_3x3_1", double)
        branches.append(self._conv_bn_relu(f"{n}_double_3x3_2", double))
        pooled = getattr(self, f"{n}_pool")(x)
        branches.append(self._conv_bn_relu(f"{n}_pool_proj", pooled) if b.pool_proj else pooled)
        return torch.cat(branches, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_pool(self._conv_bn_relu("conv1_7x7_s2", x))
        x = self._conv_bn_relu("conv2_3x3_reduce", x)
        x = self.stem_pool(self._conv_bn_relu("conv2_3x3", x))
        for block in BLOCKS:
            x = self._block(block, x)
        return x


def _block_pool(b: InceptionBlock) -> nn.Module:
    if b.stride == 2:  # reduction blocks: the pooled input is a branch of its own
        return nn.MaxPool2d(3, stride=2, ceil_mode=True)
    if b.pool == "max":  # inception_5b
        return nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
    return nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)


def adapt_cadene_state_dict(state: dict[str, torch.Tensor],
                            expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fix the known quirks of `bn_inception-52deb4733.pth` for this trunk.

    * Its BatchNorm tensors are stored as (1, C) (the Caffe port; PyTorch before 0.4 broadcast
      them silently on load, newer versions refuse): squeeze the leading 1 where that gives
      exactly the shape this trunk expects.
    * The ImageNet classifier (`last_linear.*`) has no counterpart in the trunk: dropped.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("last_linear."):
            continue
        target = expected.get(key)
        if (target is not None and value.ndim == target.ndim + 1 and value.shape[0] == 1
                and value.shape[1:] == target.shape):
            value = value.squeeze(0)
        out[key] = value
    return out
