"""The supervised pretraining stage (RFS, Meta-Baseline, P>M>F): the backbone learns to tell every
training class apart from batches of augmented images, before episodic meta-training continues from it.

``Classifier`` is the objective: the method's embedding, a linear layer over the training classes and
cross-entropy. ``BatchSampler`` draws random batches from the in-memory uint8 images on the training
device and augments them there (``augment``), so the loop never waits on a CPU data pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fewshot_edge.data.dataset import FewShotDataset
from fewshot_edge.methods import FewShotMethod
from fewshot_edge.methods.base import query_loss

CROP_SCALE = (0.25, 1.0)  # fraction of the image's area a random crop keeps
CROP_RATIO = (3 / 4, 4 / 3)  # its aspect ratio
JITTER = 0.4  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]


@dataclass
class Batch:
    """Normalised images (B, C, H, W) and their class ids in the data set."""

    images: torch.Tensor
    labels: torch.Tensor


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (resampled to the same size), horizontal flip and colour jitter of uint8
    images (B, C, H, W), as float pixel values in [0, 255]; one affine resampling for the whole batch."""
    b, channels = len(pixels), pixels.shape[1]
    device = pixels.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator, device=device)

    area = uniform(*CROP_SCALE)
    ratio = torch.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    width, height = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    flip = torch.where(torch.rand(b, generator=generator, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
    theta[:, 0, 2] = (1 - width) * uniform(-1.0, 1.0)  # the crop's centre, anywhere that keeps it inside
    theta[:, 1, 2] = (1 - height) * uniform(-1.0, 1.0)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    x = F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

    def factor() -> torch.Tensor:
        return uniform(1 - JITTER, 1 + JITTER)[:, None, None, None]

    x = x * factor()  # brightness
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray.mean(dim=(2, 3), keepdim=True)) * factor() + gray.mean(dim=(2, 3), keepdim=True)  # contrast
    if channels == 3:
        gray = x.mean(dim=1, keepdim=True)
        x = gray + (x - gray) * factor()  # saturation
    return x.clamp(0.0, 255.0)


class BatchSampler:
    """Random batches of ``batch_size`` images (drawn with a seeded generator, each image equally likely),
    augmented when ``augment``, normalised with the data set's preprocessing constants."""

    def __init__(
        self,
        dataset: FewShotDataset,
        batch_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        augment: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size, self.augment = batch_size, augment
        self.images = torch.from_numpy(dataset.images).to(self.device)
        self.labels = torch.from_numpy(dataset.labels).to(self.device)
        scale, shift = dataset.spec.scale_shift()
        self.scale, self.shift = torch.from_numpy(scale).to(self.device), torch.from_numpy(shift).to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def sample(self) -> Batch:
        ids = torch.randint(len(self.images), (self.batch_size,), generator=self.generator, device=self.device)
        pixels = self.images[ids]
        x = augment(pixels, self.generator) if self.augment else pixels.float()
        return Batch((x * self.scale + self.shift).contiguous(memory_format=torch.channels_last), self.labels[ids])


class Classifier(nn.Module):
    """The pretraining objective: ``method.embed``, then a linear layer over ``num_classes`` classes."""

    def __init__(self, method: FewShotMethod, num_classes: int) -> None:
        super().__init__()
        self.method = method
        self.head = nn.Linear(method.backbone.out_dim, num_classes)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over the classes and the batch accuracy (a 0-d tensor, not synced)."""
        logits = self.head(self.method.embed(batch.images).float())
        return query_loss(logits, batch.labels)
