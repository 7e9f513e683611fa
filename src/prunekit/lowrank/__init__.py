"""Low-rank factorization: each chosen layer becomes two smaller plain layers (W ~ U V), as
one-shot transforms on the engine (truncated SVD, data-aware SVD, ALDS), and the search for a
measured speedup. The result is a plain dense model; save it with
prunekit.structured.save_shrunk."""

from prunekit.lowrank.api import LowRankSpeedup, lowrank, lowrank_for_speedup, lowrank_layer
from prunekit.lowrank.base import LowRankConfig, factor, factor_groups
from prunekit.lowrank.methods.alds import ALDS, minimax_allocation
from prunekit.lowrank.methods.svd import SVD
from prunekit.lowrank.modules import Factorized, describe, factorized, rebuild

__all__ = ["LowRankSpeedup", "lowrank", "lowrank_for_speedup", "lowrank_layer",
           "LowRankConfig", "factor", "factor_groups", "ALDS",
           "minimax_allocation", "SVD", "Factorized", "describe", "factorized", "rebuild"]
