"""The judge of the shapes world: a small CNN that reads shape, colour, position and size off an image."""

import random

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .world import ATTRIBUTES, COLOURS, POSITIONS, SHAPES, SIZES, all_scenes, draw

NUM_CLASSES = (len(SHAPES), len(COLOURS), len(POSITIONS), len(SIZES))


class AttributeClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 32, image_size: int = 32, num_classes: tuple = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(),
        )
        features = width * 2 * (image_size // 4) ** 2
        self.heads = nn.ModuleList([nn.Linear(features, n) for n in num_classes])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images `(N, 3, H, W)` in [0, 1] -> one logits tensor per attribute."""
        x = self.body(images * 2 - 1)
        return [head(x) for head in self.heads]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 4)` predicted class indices (shape, colour, position, size)."""
        return torch.stack([logits.argmax(-1) for logits in self(images.float())], dim=-1)


def to_unit_tensor(images) -> torch.Tensor:
    """PIL images or uint8 arrays -> `(N, 3, H, W)` float in [0, 1]."""
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255


def labelled_batch(n: int, rng: random.Random, jitter: int = 1):
    scenes = [rng.choice(all_scenes()) for _ in range(n)]
    images = to_unit_tensor([draw(s, 32, jitter, rng.randrange(1 << 30)) for s in scenes])
    return images, torch.tensor([s.labels() for s in scenes])


def exact_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).all(-1).float().mean())


def train_classifier(steps: int, batch: int, seed: int):
    """Trains on the world's own images (every scene: the judge is not a model under test); returns it and its
    exact-attribute accuracy on fresh images."""
    torch.manual_seed(seed)
    rng = random.Random(seed + 7)
    model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        images, labels = labelled_batch(batch, rng)
        # Light noise so generated images (slightly blurry, noisy) are judged like drawn ones.
        images = (images + 0.03 * torch.randn_like(images)).clamp(0, 1)
        loss = sum(F.cross_entropy(logits, labels[:, i]) for i, logits in enumerate(model(images)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    images, labels = labelled_batch(512, random.Random(seed + 99))
    return model, exact_accuracy(model.predict(images), labels)


ATTRIBUTE_NAMES = ATTRIBUTES
