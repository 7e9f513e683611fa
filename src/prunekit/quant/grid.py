"""Quantization grids: the values a quantized weight may take, and the integer form it is
stored in.

Every method works on an (out, in) weight matrix (`prunekit.layers.weight_matrix`). A grid cuts
each output row into groups of `group_size` consecutive inputs (one group per row when
group_size is None: per output channel) and gives each group a scale s > 0 and an integer
zero point z; a code c in [0, 2^bits - 1] stands for the weight (c - z) * s.

    symmetric:  z = 2^(bits-1),  s = 2 max|w| / (2^bits - 1)    (GPTQ's convention)
    asymmetric: s = (max(w, 0) - min(w, 0)) / (2^bits - 1),  z = round(-min(w, 0) / s)

Zero is always on the grid (code z), so a pruned weight stays exactly zero after
quantization, and an all-zero group gets the range [-1, 1] (any positive scale would do)
instead of a scale of 0 that would turn every code into NaN. Scales come from the group's
range ("minmax") or from the shrunk range p * [min, max], p in {1, 0.99, ..., 0.21}, whose
grid has the least squared error on the group ("mse", the search of GPTQ's reference code,
with norm 2). scale_dtype="float16" rounds scales up to float16 values (stored as float32),
so formats that keep fp16 scales hold the very same grid.

Three objects, one job each: `Grid` (fit scales, quantize, dequantize, `check_tensor`: does a
tensor lie on the grid), `QuantizedWeight` (the quantized form of one layer: what kernels and
export formats read) and `ColumnQuantizer` (a grid applied one column at a time, as GPTQ and
SparseGPT's joint path visit the columns).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from prunekit.config import Config
from prunekit.errors import PruneError, all_finite


class GridViolation(PruneError):
    """A tensor does not lie on its grid."""


@dataclass(frozen=True)
class Grid(Config):
    """bits in 2..8; group_size: inputs per group (None: one group per output row); sym:
    symmetric (zero point fixed at 2^(bits-1)) or asymmetric; search: "minmax" or "mse";
    scale_dtype: "float32", or "float16" for scales that are exact float16 values."""

    bits: int = 4
    group_size: int | None = None
    sym: bool = True
    search: Literal["minmax", "mse"] = "minmax"
    scale_dtype: Literal["float32", "float16"] = "float32"

    name: ClassVar[str] = "grid"
    #: the MSE search tries p = 1 - i / MSE_STEPS for i < MAX_SHRINK * MSE_STEPS
    MSE_STEPS: ClassVar[int] = 100
    MAX_SHRINK: ClassVar[float] = 0.8

    def check(self) -> None:
        if not 2 <= self.bits <= 8:
            raise PruneError(f"bits must be in 2..8, got {self.bits} (16 bits means leaving a "
                             f"layer in floating point: exclude it instead)")
        if self.group_size is not None and self.group_size < 1:
            raise PruneError(f"group_size must be a positive number of inputs, or None for one "
                             f"group per output channel; got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    @property
    def spec(self) -> str:
        """The grid as text, e.g. 'int4', 'int4:g128:asym:mse:fp16' (see get_grid)."""
        parts = [f"int{self.bits}"]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if not self.sym:
            parts.append("asym")
        if self.search == "mse":
            parts.append("mse")
        if self.scale_dtype == "float16":
            parts.append("fp16")
        return ":".join(parts)

    def __str__(self) -> str:
        return self.spec

    # -- shapes --------------------------------------------------------------------------

    def group(self, cols: int) -> int:
        """Inputs per group for a matrix with `cols` inputs."""
        return self.group_size or cols

    def validate_shape(self, shape: tuple[int, int], layer: str = "layer") -> None:
        """Raise naming the layer unless a weight of this (out, in) shape can take the grid."""
        if self.group_size is not None and shape[1] % self.group_size:
            raise PruneError(
                f"{layer}: groups of {self.group_size} inputs need the input size to be a "
                f"multiple of {self.group_size}, but the weight has {shape[1]} inputs per row; "
                f"exclude this layer, or use another group size (or per-channel scales)")

    def storage_bits(self, shape: tuple[int, int]) -> int:
        """Bits to store an (out, in) weight on this grid: codes, scales, and zero points
        when asymmetric."""
        out, cols = shape
        groups = out * (cols // self.group(cols))
        scale_bits = 16 if self.scale_dtype == "float16" else 32
        return out * cols * self.bits + groups * (scale_bits + (0 if self.sym else self.bits))

    # -- scales and zero points ----------------------------------------------------------

    def _params(self, xmin: torch.Tensor, xmax: torch.Tensor):
        """Scale and zero point (float tensors) for ranges [xmin, xmax] that contain 0."""
        scale = (xmax - xmin) / self.maxq
        if self.scale_dtype == "float16":  # rounded up, so the grid still spans the range
            half = scale.clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
            up = torch.nextafter(half, torch.full_like(half, float("inf")))
            scale = torch.where(half.float() < scale, up, half).float()
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) // 2)
        else:
            zero = torch.round(-xmin / scale).clamp_(0, self.maxq)
        return scale, zero

    def fit(self, w: torch.Tensor, layer: str = "layer"):
        """Scales (rows, groups) float32 and zero points (rows, groups) uint8 for w (rows, in)."""
        rows, cols = w.shape
        self.validate_shape((rows, cols), layer)
        g = self.group(cols)
        x = w.detach().float().reshape(rows, cols // g, g)
        xmin = x.amin(dim=2).clamp(max=0.0)
        xmax = x.amax(dim=2).clamp(min=0.0)
        if self.sym:
            xmax = torch.maximum(-xmin, xmax)
            xmin = -xmax
        empty = xmax == xmin  # an all-zero group: any positive scale puts it on code z
        xmin = torch.where(empty, -1.0, xmin)
        xmax = torch.where(empty, 1.0, xmax)
        scale, zero = self._params(xmin, xmax)
        if self.search == "mse":
            best = torch.full_like(scale, float("inf"))
            for i in range(int(self.MAX_SHRINK * self.MSE_STEPS)):
                p = 1 - i / self.MSE_STEPS
                s1, z1 = self._params(p * xmin, p * xmax)
                s3, z3 = s1.unsqueeze(2), z1.unsqueeze(2)
                q = (torch.clamp(torch.round(x / s3) + z3, 0, self.maxq) - z3) * s3
                err = (q - x).square_().sum(dim=2)
                better = err < best
                best = torch.where(better, err, best)
                scale = torch.where(better, s1, scale)
                zero = torch.where(better, z1, zero)
        self.check_params(scale, zero, (rows, cols), layer)
        return scale.contiguous(), zero.to(torch.uint8).contiguous()

    def check_params(self, scales: torch.Tensor, zeros: torch.Tensor, shape: tuple[int, int],
                     layer: str = "layer") -> None:
        """Raise naming the layer (and the row and group) unless scales and zero points fit
        a weight of `shape` on this grid: finite positive scales, zero points in range."""
        rows, cols = shape
        self.validate_shape(shape, layer)
        want = (rows, cols // self.group(cols))
        for what, t in (("scales", scales), ("zero points", zeros)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                raise PruneError(f"{layer}: {what} must have shape {want} (rows, groups) for "
                                 f"a {rows}x{cols} weight on {self.spec}, got "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        bad = ~(torch.isfinite(scales) & (scales > 0))
        if bad.any():
            r, g = (int(i) for i in bad.nonzero()[0])
            raise PruneError(
                f"{layer}: the scale of row {r}, group {g} is {float(scales[r, g])!r}; scales "
                f"must be finite and positive (a scale of 0 from an all-zero group makes every "
                f"code NaN): fit the grid with Grid.fit, which gives such groups a unit range")
        z = zeros.float()
        if not torch.equal(z, z.round()) or (z < 0).any() or (z > self.maxq).any():
            raise PruneError(f"{layer}: zero points must be integers in 0..{self.maxq}")
        if self.sym and (z != (self.maxq + 1) // 2).any():
            raise PruneError(f"{layer}: a symmetric {self.bits}-bit grid has every zero point "
                             f"at {(self.maxq + 1) // 2}")

    # -- codes ---------------------------------------------------------------------------

    def expand(self, t: torch.Tensor, cols: int) -> torch.Tensor:
        """Per-group values (rows, groups) as per-input ones (rows, cols)."""
        return t.repeat_interleave(self.group(cols), dim=1)

    def codes(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """Round to nearest: uint8 codes of w (rows, in) on the given scales and zero points."""
        cols = w.shape[1]
        s, z = self.expand(scales, cols), self.expand(zeros, cols).float()
        return torch.clamp(torch.round(w.float() / s) + z, 0, self.maxq).to(torch.uint8)

    def values(self, codes: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor) -> torch.Tensor:
        """The float32 weights the codes stand for: (c - z) * s."""
        cols = codes.shape[1]
        s, z = self.expand(scales, cols), self.expand(zeros, cols)
        return (codes.float() - z.float()) * s

    def quantize(self, w: torch.Tensor, scales: torch.Tensor | None = None,
                 zeros: torch.Tensor | None = None, layer: str = "layer") -> QuantizedWeight:
        """w rounded to the nearest grid point; scales and zero points fitted unless given."""
        w = _matrix(w, layer)
        if scales is None or zeros is None:
            scales, zeros = self.fit(w, layer)
        self.check_params(scales, zeros, tuple(w.shape), layer)
        return QuantizedWeight(self, self.codes(w, scales, zeros), scales.float(),
                               zeros.to(torch.uint8))

    @staticmethod
    def dequantize(q: QuantizedWeight) -> torch.Tensor:
        return q.dequantize()

    def check_tensor(self, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     layer: str = "layer") -> None:
        """Raise GridViolation unless every entry of w equals (c - z) * s for an integer code
        c in range: w lies on this grid with these scales and zero points."""
        w = _matrix(w, layer)
        self.check_params(scales, zeros, tuple(w.shape), layer)
        off = self.values(self.codes(w, scales, zeros), scales, zeros) != w.float()
        if off.any():
            r, c = (int(i) for i in off.nonzero()[0])
            raise GridViolation(f"{layer}: {int(off.sum())} weights are off the {self.spec} "
                                f"grid, the first at row {r}, input {c} ({float(w[r, c])!r})")


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One layer's weight in quantized form: what integer kernels and export formats read.

    For the layer's (out, in) weight matrix (`prunekit.layers.weight_matrix`: for a convolution
    in = in_channels * prod(kernel_size), in PyTorch's memory order) and g = grid.group(in):

        W[r, c] = (codes[r, c] - zeros[r, c // g]) * scales[r, c // g]     (in float32)

    codes: (out, in) uint8 in 0..2^bits - 1. scales: (out, in // g) float32, finite and > 0
    (exact float16 values when grid.scale_dtype is "float16"). zeros: (out, in // g) uint8
    (all 2^(bits-1) on a symmetric grid). keep: None, or, for a layer pruned and quantized in
    one pass, the (out, in) bool keep-mask; where it is False the code is the zero point, so
    the weight is exactly 0 (a kept weight may round to 0 too: the mask says which are pruned).
    """

    grid: Grid
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    keep: torch.Tensor | None = None

    #: the tensors `tensors()` returns, by name
    FIELDS: ClassVar[tuple[str, ...]] = ("codes", "scales", "zeros", "keep")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The (out, in) float32 weight the codes stand for."""
        return self.grid.values(self.codes, self.scales, self.zeros)

    def storage_bits(self) -> int:
        """Bits to store this form: codes, scales, zero points (asymmetric) and the keep-mask
        (one bit a weight, when present)."""
        out, cols = self.shape
        return self.grid.storage_bits((out, cols)) + (out * cols if self.keep is not None else 0)

    def check(self, layer: str = "layer") -> None:
        """Raise naming the layer unless the form is consistent: dtypes, shapes, codes in
        range, finite positive scales, pruned weights on their zero point."""
        codes = self.codes
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != torch.uint8:
            raise PruneError(f"{layer}: quantized codes must be an (out, in) uint8 tensor, got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)}")
        if codes.numel() and int(codes.max()) > self.grid.maxq:
            raise PruneError(f"{layer}: codes exceed {self.grid.maxq}, the largest "
                             f"{self.grid.bits}-bit code")
        self.grid.check_params(self.scales, self.zeros, self.shape, layer)
        if self.keep is not None:
            keep = self.keep
            if keep.dtype != torch.bool or tuple(keep.shape) != self.shape:
                raise PruneError(f"{layer}: the keep-mask must be a bool tensor of shape "
                                 f"{self.shape}")
            zeros = self.grid.expand(self.zeros, self.shape[1])
            if (codes[~keep] != zeros[~keep]).any():
                raise PruneError(f"{layer}: some pruned weight's code is not its zero point "
                                 f"(the weight would not be 0)")

    def tensors(self) -> dict[str, torch.Tensor]:
        """{'codes': ..., 'scales': ..., 'zeros': ..., 'keep': ... (when present)}."""
        out = {"codes": self.codes, "scales": self.scales, "zeros": self.zeros}
        if self.keep is not None:
            out["keep"] = self.keep
        return out

    @classmethod
    def from_tensors(cls, grid: Grid | str, tensors: dict, layer: str = "layer"):
        """The form back from `tensors()`'s output and its grid, checked."""
        missing = [k for k in ("codes", "scales", "zeros") if k not in tensors]
        if missing:
            raise PruneError(f"{layer}: the quantized form lacks {', '.join(missing)}")
        q = cls(get_grid(grid), tensors["codes"], tensors["scales"], tensors["zeros"],
                tensors.get("keep"))
        q.check(layer)
        return q


class ColumnQuantizer:
    """A grid applied one column at a time, in the order a column sweep visits the columns
    (GPTQ; SparseGPT pruning and quantizing in one pass).

    w: the (rows, in) matrix before the sweep, in its own column order. perm: the sweep's order
    (sweep position j is column perm[j]; None: left to right). Scales and zero points are
    fitted on w up front when they are static: per output channel, or with static=True (needed
    with a permutation, so that a group stays a run of consecutive inputs of w). Otherwise each
    group's are fitted when the sweep reaches the block holding its first column, on the weights
    as the sweep has updated them (`fit_block`). The codes are kept in w's own column order.
    """

    def __init__(self, grid: Grid, w: torch.Tensor, layer: str = "layer",
                 perm: torch.Tensor | None = None, static: bool = False):
        rows, cols = w.shape
        grid.validate_shape((rows, cols), layer)
        self.grid, self.layer = grid, layer
        self.g = grid.group(cols)
        self.perm = None if perm is None else [int(p) for p in perm]
        self.dynamic = grid.group_size is not None and not static
        if self.dynamic and perm is not None:
            raise PruneError(f"{layer}: a permuted sweep needs static groups (static=True)")
        if self.dynamic:
            self.scales = torch.ones((rows, cols // self.g))
            self.zeros = torch.zeros((rows, cols // self.g), dtype=torch.uint8)
        else:
            self.scales, self.zeros = grid.fit(w, layer)
        self._zf = self.zeros.float()
        self._codes_t = torch.zeros((cols, rows), dtype=torch.uint8)  # a column is contiguous

    def fit_block(self, i1: int, i2: int, wt: torch.Tensor) -> None:
        """When the sweep reaches the block of positions [i1, i2): fit each group that starts
        there on its columns as the earlier blocks' updates left them (wt is the sweep's
        transposed matrix: wt[j] is position j). GPTQ's reference code fits groups at this
        point too; on MiniLM layers at 3 and 4 bits in groups of 32 and 64 it gave 0.5% less
        output error on average than fitting each group on its fully updated columns."""
        if not self.dynamic:
            return
        for k in range(-(-i1 // self.g) * self.g, i2, self.g):
            s, z = self.grid.fit(wt[k:k + self.g].t(), self.layer)
            self.scales[:, k // self.g] = s[:, 0]
            self.zeros[:, k // self.g] = z[:, 0]
            self._zf[:, k // self.g] = z[:, 0].float()

    def __call__(self, j: int, col: torch.Tensor) -> torch.Tensor:
        """Quantize the column at sweep position j (rows,): record its codes, return the
        grid values (exactly what dequantize() gives for them)."""
        c = j if self.perm is None else self.perm[j]
        k = c // self.g
        s, z = self.scales[:, k], self._zf[:, k]
        code = torch.clamp(torch.round(col.float() / s) + z, 0, self.grid.maxq)
        self._codes_t[c] = code
        return ((code - z) * s).to(col.dtype)

    def result(self, keep: torch.Tensor | None = None) -> QuantizedWeight:
        return QuantizedWeight(self.grid, self._codes_t.t().contiguous(), self.scales,
                               self.zeros, keep)


def _matrix(w, layer: str) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise PruneError(f"{layer}: a grid takes a floating (out, in) matrix, got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    if not all_finite(w):
        raise PruneError(f"{layer}: the weight holds NaN or Inf")
    return w


_SPEC = re.compile(r"^(?:int|w)?([0-9]+)(?:bit)?$")


def get_grid(spec: str | Grid) -> Grid:
    """A Grid from text: 'int4' (per output channel, symmetric, min-max), then any of
    ':g128' (groups of 128 inputs), ':asym', ':mse', ':fp16' (float16 scales), e.g.
    'int4:g128:asym'."""
    if isinstance(spec, Grid):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise PruneError(f"a grid is text such as 'int4' or 'int4:g128:asym', got {spec!r}")
    head, *rest = spec.strip().lower().split(":")
    m = _SPEC.match(head)
    if not m:
        raise PruneError(f"unknown grid {spec!r}: it starts with the bit width, e.g. 'int4', "
                         f"then optional ':g128', ':asym', ':mse', ':fp16'")
    opts: dict = {"bits": int(m.group(1))}
    for part in rest:
        if re.fullmatch(r"g[0-9]+", part):
            opts["group_size"] = int(part[1:])
        elif part in ("asym", "sym"):
            opts["sym"] = part == "sym"
        elif part in ("mse", "minmax"):
            opts["search"] = part
        elif part in ("fp16", "fp32"):
            opts["scale_dtype"] = "float16" if part == "fp16" else "float32"
        elif part in ("channel", "perchannel"):
            opts["group_size"] = None
        else:
            raise PruneError(f"grid {spec!r}: unknown part {part!r}; use gN (groups of N "
                             f"inputs), asym, mse or fp16")
    return Grid(**opts)
