"""Image transforms of the MLRC protocol, with each trunk's input normalisation (held by the
trunk registry, harness.models TRUNKS).

Train: Resize(resize) -> RandomResizedCrop(crop, scale, ratio) -> RandomHorizontalFlip
       (data.random_crop=false: the eval crop instead of RandomResizedCrop).
Eval:  Resize(resize) -> CenterCrop(crop).
Then ToTensor and the trunk's normalisation:
  * bninception: BGR channel order, range 0-255, minus [104, 117, 128] (B, G, R), std 1 (the
    Caffe convention of the ported weights);
  * resnet18 / resnet50: RGB 0-1, ImageNet mean / std;
  * small_cnn: RGB 0-1, mean 0.5, std 0.5 (as its glyph pretraining, harness/glyph_trunk.py).
Horizontal flip is on by default except for small_cnn, whose glyph data are characters: a
mirrored character is another character (or none), so flipping would corrupt the labels.

Every transform is a module-level class (no lambdas) so DataLoader workers can pickle it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from harness.models import input_norm


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
    norm = input_norm(trunk)
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


# ---------------------------------------------------------------------------------------------
# The fast path: uint8 images already resized (harness/image_cache.py) -> crop in the loader
# workers (a slice and one small uint8 resize, no decode) -> flip, float conversion and the
# trunk's normalisation on the device, for the whole batch at once.
# `build_transforms` above is the reference: evaluation is identical to it, and training draws
# crops from the same distribution (same RandomResizedCrop parameters; torchvision's antialiased
# tensor resize instead of PIL's, which differ by rounding).


def _shape_only(height: int, width: int) -> torch.Tensor:
    """A (1, h, w) stand-in with no memory: RandomResizedCrop.get_params reads only the size."""
    return torch.zeros(1, dtype=torch.uint8).expand(1, height, width)


class UInt8Crop:
    """(h, w, 3) uint8 array after Resize(resize) -> (3, crop, crop) uint8 tensor.

    Train: RandomResizedCrop(crop, scale, ratio); eval: CenterCrop(crop)."""

    def __init__(self, crop: int, train: bool, scale=(0.16, 1.0), ratio=(0.75, 1.33)):
        self.crop, self.train = crop, train
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        h, w = image.shape[:2]
        if self.train:
            # PIL's crop, then its bilinear resize: the very operations (and pixels) of the
            # reference RandomResizedCrop on a PIL image, and several times faster than a
            # tensor resize on small images. The parameters come from torchvision's sampler.
            top, left, ch, cw = T.RandomResizedCrop.get_params(
                _shape_only(h, w), self.scale, self.ratio)
            window = np.ascontiguousarray(image[top:top + ch, left:left + cw])
            out = Image.fromarray(window).resize((self.crop, self.crop), Image.BILINEAR)
        else:  # CenterCrop's rounding
            top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
            out = image[top:top + self.crop, left:left + self.crop]
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)  # a writable copy

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop={self.crop}, train={self.train}, "
                f"scale={self.scale}, ratio={self.ratio})")


class BatchNormalize(torch.nn.Module):
    """uint8 (B, 3, H, W) batch on the device -> float input of the trunk, optionally with a
    random horizontal flip per image (training). Runs where the batch is: on the GPU when
    training on one, so the loader workers only move uint8 bytes."""

    def __init__(self, trunk: str, train: bool, hflip: bool | None = None,
                 channels_last: bool = False):
        super().__init__()
        norm = input_norm(trunk)
        self.flip = train and (norm.hflip if hflip is None else hflip)
        self.bgr_255 = norm.bgr_255
        scale = 1.0 if norm.bgr_255 else 255.0  # ToTensor's /255, folded into mean and std
        mean = torch.tensor(norm.mean).view(1, 3, 1, 1) * scale
        std = torch.tensor(norm.std).view(1, 3, 1, 1) * scale
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.float()
        if self.bgr_255:
            x = x.flip(1)  # RGB -> BGR, values stay 0-255
        if self.flip:
            mirror = torch.rand(len(x), generator=generator, device="cpu") < 0.5
            if mirror.any():
                mirror = mirror.to(x.device)
                x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
