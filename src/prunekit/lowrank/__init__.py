"""Low-rank factorization: each chosen layer becomes two smaller plain layers (W ~ U V), as
one-shot transforms on the engine (truncated SVD, data-aware SVD, ALDS), and the search for a
measured speedup. The result is a plain dense model; save it with
prunekit.structured.save_shrunk."""

from prunekit.lowrank.api import LowRankSpeedup, lowrank, lowrank_for_speedup, lowrank_layer
from prunekit.lowrank.base import LowRankConfig, factor, factor_groups
from prunekit.lowrank.methods.alds import ALDS, minimax_allocation
from prunekit.lowrank.methods.svd import SVD
from prunekit.lowrank.modules import Factorized, describe, factorized, rebuild


def __getattr__(name: str):
    if name == "latency_costs":  # times layers: imports the runtime, so on first use
        from prunekit.lowrank.latency import latency_costs

        return latency_costs
    raise AttributeError(f"module 'prunekit.lowrank' has no attribute {name!r}")


__all__ = ["LowRankSpeedup", "lowrank", "lowrank_for_speedup", "lowrank_layer",
           "LowRankConfig", "factor", "factor_groups", "latency_costs", "ALDS",
           "minimax_allocation", "SVD", "Factorized", "describe", "factorized", "rebuild"]
