"""One-shot pruning methods; importing this package fills the registry."""

from prunekit.methods.base import METHODS, PruneConfig, get_method, register
from prunekit.methods.magnitude import Magnitude
from prunekit.methods.obs import OBS
from prunekit.methods.random import Random
from prunekit.methods.sparsegpt import SparseGPT
from prunekit.methods.wanda import Wanda
from prunekit.methods.woodfisher import WoodFisher

__all__ = ["METHODS", "PruneConfig", "get_method", "register", "Magnitude", "OBS", "Random",
           "SparseGPT", "Wanda", "WoodFisher"]
