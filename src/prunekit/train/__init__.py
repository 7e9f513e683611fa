"""Sparsity during training: schedules that plug into any PyTorch training loop.

    sched = prunekit.train.RigL(model, optimizer, density=0.1, delta_t=100, t_end=7500)
    for x, y in loader:
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        sched.step()

Every schedule keeps pruned weights at exactly zero through the optimizer (MaskHolder),
reports `.sparsity()` and `.next_event()`, and saves with `.state_dict()` or `save_sparse`.
`SCHEDULES` holds them all by name with what each needs and supports; a new schedule is one
file here with one `@SCHEDULES.register(...)` decorator.
`prunekit.train.lightning.SparsityCallback` runs any schedule inside PyTorch Lightning.
"""

from prunekit.train.base import ANY_PATTERN, SCHEDULES, Schedule, load_sparse, save_sparse
from prunekit.train.gap import GaP
from prunekit.train.gmp import GMP, cubic_sparsity
from prunekit.train.l0 import L0
from prunekit.train.lottery import LotteryTicket
from prunekit.train.masks import MaskHolder, layer_densities
from prunekit.train.rigl import RigL
from prunekit.train.smcp import SMCP
from prunekit.train.snip import SNIP, snip_scores
from prunekit.train.static import Static

__all__ = ["ANY_PATTERN", "GMP", "L0", "SCHEDULES", "SMCP", "SNIP", "GaP", "LotteryTicket",
           "MaskHolder", "RigL", "Schedule", "Static", "cubic_sparsity", "layer_densities",
           "load_sparse", "save_sparse", "snip_scores"]
