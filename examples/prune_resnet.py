"""Prune a pretrained CIFAR-10 ResNet-20 one-shot with SparseGPT and see what accuracy it
keeps: the shortest path from a model to a pruned model.

    python examples/prune_resnet.py [--sparsity 0.7] [--images 1000]

Needs the shared data folder ($PRUNEKIT_DATA): CIFAR-10 and the pretrained weights.
"""

import argparse

import prunekit
from prunekit.data import calibration_images, cifar10_tensors
from prunekit.evaluate import reestimate_bn, top1_accuracy

ap = argparse.ArgumentParser()
ap.add_argument("--sparsity", type=float, default=0.7)
ap.add_argument("--images", type=int, default=1000, help="test images to score")
args = ap.parse_args()

model = prunekit.models.create("resnet20-cifar10", pretrained=True)
images, labels = cifar10_tensors("test", limit=args.images)
print(f"dense top-1: {top1_accuracy(model, images, labels):.2f}")

calib = list(calibration_images(128, seed=0).split(32))    # CIFAR-10 train side only
report = prunekit.prune(model, prunekit.SparseGPT(sparsity=args.sparsity), calib,
                        progress=False)
print(report)                                              # per-layer sparsity, error, time
reestimate_bn(model, calibration_images(1024, seed=1, augment=True))
print(f"pruned top-1 at {report.sparsity:.0%} zeros: {top1_accuracy(model, images, labels):.2f}")
