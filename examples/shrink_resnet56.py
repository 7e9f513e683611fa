"""Shrink a pretrained CIFAR-10 ResNet-56 to half its FLOPs by removing whole channels, save
it, load it back, and see what accuracy it keeps before and after a short fine-tune.

    python examples/shrink_resnet56.py [--flops-ratio 0.5] [--images 1000] [--steps 200]

The result is a plain, smaller dense model (no masks, no zeros): it runs faster with the
ordinary PyTorch kernels. Needs the shared data folder ($PRUNEKIT_DATA).
"""

import argparse
import tempfile
from pathlib import Path

import torch

import prunekit
from prunekit.data import cifar10_tensors
from prunekit.evaluate import top1_accuracy
from prunekit.structured import load_shrunk, save_shrunk

ap = argparse.ArgumentParser()
ap.add_argument("--flops-ratio", type=float, default=0.5, help="fraction of the FLOPs kept")
ap.add_argument("--images", type=int, default=1000, help="test images to score")
ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps (batch 64)")
args = ap.parse_args()
torch.manual_seed(0)

model = prunekit.models.create("resnet56-cifar10", pretrained=True).eval()
images, labels = cifar10_tensors("test", limit=args.images)
print(f"dense top-1: {top1_accuracy(model, images, labels):.2f}")

config = prunekit.ChannelPrune(flops_ratio=args.flops_ratio, importance="l1")
small, report = prunekit.shrink(model, config, example_inputs=images[:8])
print(report)  # parameters, FLOPs and measured latency before and after
print(f"shrunk top-1 (no fine-tune): {top1_accuracy(small, images, labels):.2f}")

# a short fine-tune on CIFAR-10 training images (the test images are not used)
train_x, train_y = cifar10_tensors("train", limit=64 * args.steps)
opt = torch.optim.SGD(small.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
small.train()
for x, y in zip(train_x.split(64), train_y.split(64)):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(small(x), y).backward()
    opt.step()
small.eval()
print(f"shrunk top-1 after {args.steps} steps: {top1_accuracy(small, images, labels):.2f}")

# the saved file holds the weights and the new shapes; it loads into a fresh ResNet-56
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "resnet56-half.safetensors"
    save_shrunk(small, path)
    again = load_shrunk(prunekit.models.create("resnet56-cifar10"), path).eval()
    same = torch.equal(again(images[:16]), small(images[:16]))
    print(f"saved {path.stat().st_size / 1e6:.2f} MB; reloaded model gives the same outputs: "
          f"{same}")
