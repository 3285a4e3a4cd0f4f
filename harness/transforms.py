"""Image transforms of the MLRC protocol, with each trunk's input normalisation.

Train: Resize(resize) -> RandomResizedCrop(crop, scale, ratio) -> RandomHorizontalFlip.
Eval:  Resize(resize) -> CenterCrop(crop).
Then ToTensor and the trunk's normalisation:
  * bninception: BGR channel order, range 0-255, minus [104, 117, 128] (B, G, R), std 1 (the
    Caffe convention of the ported weights);
  * resnet18 / resnet50: RGB 0-1, ImageNet mean / std;
  * small_cnn: RGB 0-1, mean 0.5, std 0.5 (random init, so just centred).
Horizontal flip is on by default except for small_cnn, whose glyph data are characters: a
mirrored character is another character (or none), so flipping would corrupt the labels.

Every transform is a module-level class (no lambdas) so DataLoader workers can pickle it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision import transforms as T

from harness.errors import ConfigError


@dataclass(frozen=True)
class InputNorm:
    bgr_255: bool  # reorder to BGR and scale to 0-255 before mean/std (Caffe-ported weights)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool  # default for training-time horizontal flips


IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
INPUT_NORMS: dict[str, InputNorm] = {
    "bninception": InputNorm(bgr_255=True, mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0),
                             hflip=True),
    "resnet18": InputNorm(bgr_255=False, **IMAGENET, hflip=True),
    "resnet50": InputNorm(bgr_255=False, **IMAGENET, hflip=True),
    "small_cnn": InputNorm(bgr_255=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           hflip=False),
}


class EnsureRGB:
    """PIL image -> RGB (CUB holds a few grayscale images; a trunk wants 3 channels).
    Anything that is not a PIL image passes unchanged."""

    def __call__(self, image):
        mode = getattr(image, "mode", "RGB")
        return image if mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ToBGR255:
    """(3, H, W) RGB tensor in [0, 1] -> BGR in [0, 255]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[[2, 1, 0]] * 255.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_transforms(trunk: str, resize: int = 256, crop: int = 227, train: bool = True,
                     scale=(0.16, 1.0), ratio=(0.75, 1.33),
                     hflip: bool | None = None) -> Callable:
    """The PIL image -> tensor transform for `trunk`; `hflip` None = the trunk's default."""
    if trunk not in INPUT_NORMS:
        raise ConfigError(f"model.trunk {trunk!r}: no input normalisation known; expected one "
                          f"of {', '.join(INPUT_NORMS)}")
    norm = INPUT_NORMS[trunk]
    steps: list[Callable] = [EnsureRGB(), T.Resize(resize)]
    if train:
        steps.append(T.RandomResizedCrop(crop, scale=tuple(scale), ratio=tuple(ratio)))
        if norm.hflip if hflip is None else hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps.append(T.CenterCrop(crop))
    steps.append(T.ToTensor())
    if norm.bgr_255:
        steps.append(ToBGR255())
    steps.append(T.Normalize(mean=norm.mean, std=norm.std))
    return T.Compose(steps)
