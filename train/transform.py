"""Image transforms with PIL, numpy and torch only (no torchvision at run time,
docs/environment.md#pytorch-and-torchvision).

Training: random resized crop (area scale 0.9-1.0 and aspect ratio 3/4-4/3, as the paper's
RandomResizedCrop), bicubic resize, as uint8: batches cross the data loader at a quarter of the
float32 size, and the trainer normalises them on the device (`normalize`). Evaluation: resize the
shorter side, centre crop, the same normalisation, as float. Randomness comes from an explicit random.Random so the data
stream can reproduce every crop when a run resumes.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's normalisation (the statistics its image tower was trained with).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
RATIO = (3 / 4, 4 / 3)


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) on any device -> CLIP-normalised float32, on that device."""
    mean = torch.tensor(MEAN, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, H, W)."""
    return normalize(to_uint8(image))


def random_crop_box(width: int, height: int, scale: tuple[float, float],
                    rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: a box of random area and aspect ratio.

    Ten tries at a box that fits; otherwise the largest centred box of ratio in RATIO.
    Returns (left, top, right, bottom).
    """
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_transform(image: Image.Image, size: int, scale: tuple[float, float], rng: random.Random) -> torch.Tensor:
    """Random resized crop to size x size: uint8 (3, size, size), normalised later by `normalize`."""
    image = image.convert("RGB")
    box = random_crop_box(image.width, image.height, scale, rng)
    return to_uint8(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bicubic), centre crop size x size, normalise."""
    image = image.convert("RGB")
    factor = size / min(image.width, image.height)
    w, h = max(size, round(image.width * factor)), max(size, round(image.height * factor))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return to_tensor(image.crop((left, top, left + size, top + size)))


def preprocess_spec(size: int) -> dict:
    """What an evaluator needs to reproduce eval_transform; recorded in exported checkpoints."""
    return {"image_size": size, "resize": "shorter side, bicubic", "crop": "center", "mean": list(MEAN),
            "std": list(STD)}
