"""Sparse matrix kernels for inference and the layers that use them.

Every kernel computes W @ X for a fixed sparse W (out, in) and a dense X (in, n): a linear
layer passes its input rows transposed, a convolution its im2col patches (modules.py).
KERNELS holds them by name, each in its own file with what it serves (base.py says how to
add one):

- "dense": the layer as it was (PyTorch's own GEMM / convolution).
- "csr": torch.sparse CSR times dense (MKL sparse BLAS where PyTorch has it).
- "block": a 1xN kernel, all block rows as one batched matmul on gathered columns.
- "2:4": PyTorch's semi-structured sparse tensors, on a CUDA GPU with compute capability 8.0+.
"""

# imported in the order the kernels are listed (KERNELS keeps registration order)
from prunekit.runtime.kernels.base import KERNELS, make_kernel, rtol  # noqa: I001
from prunekit.runtime.kernels.dense import DenseWeight
from prunekit.runtime.kernels.csr import CSRWeight
from prunekit.runtime.kernels.block import BlockWeight, block_size_of
from prunekit.runtime.kernels.semi_structured import (
    SemiStructuredWeight,
    semi_structured_unavailable,
)
from prunekit.runtime.kernels.modules import (
    SparseConv2d,
    SparseLinear,
    sparse_module,
    unsupported_reason,
)

# bumped when a kernel's speed changes: cached latency tables are then measured again
VERSION = 5

__all__ = ["KERNELS", "VERSION", "BlockWeight", "CSRWeight", "DenseWeight",
           "SemiStructuredWeight", "SparseConv2d", "SparseLinear", "block_size_of",
           "make_kernel", "rtol", "semi_structured_unavailable", "sparse_module",
           "unsupported_reason"]
