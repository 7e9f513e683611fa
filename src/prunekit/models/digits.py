"""A small CNN for scikit-learn's 8x8 digits, trained deterministically in a few seconds and
cached (atomically) so later calls load the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.io import load_weights, save_weights


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _cache_path() -> Path:
    from prunekit.data import cache_dir
    return cache_dir() / "digits-cnn-v1.safetensors"


def train_digits_cnn(epochs: int = 30, seed: int = 0) -> DigitsCNN:
    """Adam on the digits train split, full determinism from the seed (single thread)."""
    from prunekit.data import load_digits

    x, y = load_digits("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for idx in perm.split(64):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def create_digits_cnn(pretrained: bool = False) -> DigitsCNN:
    if not pretrained:
        return DigitsCNN().eval()
    path = _cache_path()
    if path.exists():
        return load_weights(DigitsCNN(), path).eval()
    model = train_digits_cnn()
    save_weights(model, path, metadata={"source": "prunekit.models.digits.train_digits_cnn"})
    return model
