"""Sparse training with RigL in your own loop: 90% of the weights stay zero from the first
step, and the mask is rewired by gradient magnitude every few steps.

    python examples/rigl_training.py [--steps 300]

Trains a small CNN on scikit-learn's bundled digits (no data folder needed).
"""

import argparse

import torch
from torch import nn

import prunekit
from prunekit.data import load_digits
from prunekit.evaluate import top1_accuracy

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
args = ap.parse_args()

torch.manual_seed(0)
x, y = load_digits("train")
xt, yt = load_digits("test")
model = prunekit.models.create("digits-cnn").train()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sched = prunekit.train.RigL(model, optimizer, density=0.1, delta_t=50, t_end=args.steps)

for step in range(args.steps):
    idx = torch.randint(0, len(x), (64,))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
    optimizer.step()
    sched.step()                     # masks the update, and rewires on its schedule
    if step % 100 == 0:
        print(f"step {step}: sparsity {sched.sparsity():.3f}, next {sched.next_event()}")

print(f"top-1 at {sched.sparsity():.0%} sparsity: {top1_accuracy(model, xt, yt):.1f}")
