"""The kernel registry and the one way a kernel is built for a weight.

A kernel computes W @ X for a fixed (out, in) float weight W and a dense X (in, n). It is a
class registered with metadata:

    @KERNELS.register("csr", device="any", serves="any zero pattern", pattern="unstructured")
    class CSRWeight:
        name = "csr"
        @staticmethod
        def unavailable(w) -> str | None: ...   # why it cannot serve w here, or None
        def __init__(self, w): ...              # store W in the kernel's own format
        def matmul(self, xt): ...               # W @ xt
        def nbytes(self) -> int: ...            # the stored size

optionally `linear(x)` (x @ W^T for row-major x) and `matmul_batched(x)` (W @ x[b]), which
the layers use when present. Metadata: `device` ("any", or "cuda" for a GPU-only kernel),
`serves` (which weights, in words, for help texts), `pattern` (a prunekit pattern whose masks
it serves, for the generated tests), `rtol` (the output error relative to the largest output
that still counts as equal: above float32 rounding only for reduced-precision kernels).

A new kernel is one file in this package with one decorated class: convert, the CLI's
--kernels choices and tests/test_runtime_kernels_registry.py pick it up from KERNELS.
"""

from __future__ import annotations

import torch

from prunekit.errors import PruneError
from prunekit.registry import Registry

#: every kernel, by name; filled by the decorator in each kernel's file
KERNELS = Registry("kernel", packages=("prunekit.runtime.kernels",))

#: the relative tolerance of a kernel with no `rtol` metadata (float32 sums in another order)
RTOL = 1e-4


def make_kernel(kind: str, w: torch.Tensor):
    """A kernel object for a (out, in) float weight; raises PruneError when it cannot serve."""
    cls = KERNELS.get(kind)
    why = cls.unavailable(w)
    if why:
        raise PruneError(f"{kind} kernel: {why}")
    return cls(w)


def rtol(kind: str) -> float:
    """The relative output tolerance of kernel `kind`."""
    return float(KERNELS.entry(kind).meta.get("rtol", RTOL))
