"""Sparsity patterns: which sets of weights may be removed together.

A pattern has two jobs: choose a keep-mask from scores (higher score = more worth keeping),
and check that a mask obeys it. Every pattern works on a 2-D weight view of shape
(out_features, in_features); for a convolution, in_features is in_channels/groups * kernel size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from prunekit.errors import PruneError


class PatternViolation(PruneError):
    """A mask does not obey its pattern."""


def _count_to_prune(total: int, sparsity: float) -> int:
    return int(round(sparsity * total))


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    if not isinstance(sparsity, (int, float)) or not (0.0 <= float(sparsity) < 1.0):
        raise PruneError(f"{what} must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


class Pattern:
    """Base class. Subclasses implement `select`, `check` and `validate_shape`."""

    name: str = "pattern"
    #: The sparsity the pattern itself fixes (N:M), or None when the caller chooses it.
    implied_sparsity: float | None = None

    def validate_shape(self, shape: tuple[int, int], layer: str = "layer") -> None:
        """Raise a clear error if a weight of this 2-D shape cannot take the pattern."""

    def select(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Return a bool keep-mask of scores' shape that prunes the lowest scores."""
        raise NotImplementedError

    def prunes_all(self, shape: tuple[int, int], sparsity: float) -> bool:
        """True when `sparsity` would remove every weight of a matrix of this shape (or of a
        whole row, for per-row counts): an emptied layer computes nothing."""
        return False

    def check(self, mask: torch.Tensor, sparsity: float | None = None) -> None:
        """Raise PatternViolation unless `mask` (True = kept) obeys the pattern."""
        raise NotImplementedError

    def resolve_sparsity(self, sparsity: float | None) -> float:
        if self.implied_sparsity is not None:
            if sparsity is not None and abs(sparsity - self.implied_sparsity) > 1e-9:
                raise PruneError(
                    f"pattern {self.name} fixes sparsity at {self.implied_sparsity:g}; "
                    f"got sparsity={sparsity!r} (leave it unset)"
                )
            return self.implied_sparsity
        if sparsity is None:
            raise PruneError(f"pattern {self.name} needs a sparsity in [0, 1)")
        return check_sparsity(sparsity)

    def __str__(self) -> str:
        return self.name


def _smallest_k_mask(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Keep-mask that drops exactly k smallest entries (per slice along `dim` if given)."""
    keep = torch.ones(scores.shape, dtype=torch.bool)
    if k <= 0:
        return keep
    if dim is None:
        flat = scores.reshape(-1)
        idx = torch.topk(flat, k, largest=False, sorted=False).indices
        keep.view(-1)[idx] = False
        return keep
    idx = torch.topk(scores, k, dim=dim, largest=False, sorted=False).indices
    keep.scatter_(dim, idx, False)
    return keep


@dataclass(frozen=True)
class Unstructured(Pattern):
    """Any weight may go. per="layer" compares all weights of a layer, "row" each output row."""

    per: str = "layer"

    def __post_init__(self):
        if self.per not in ("layer", "row"):
            raise PruneError(f"Unstructured(per=...) must be 'layer' or 'row', got {self.per!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "unstructured" if self.per == "layer" else "unstructured:row"

    def select(self, scores, sparsity):
        sparsity = check_sparsity(sparsity)
        if self.per == "layer":
            return _smallest_k_mask(scores, _count_to_prune(scores.numel(), sparsity))
        return _smallest_k_mask(scores, _count_to_prune(scores.shape[1], sparsity), dim=1)

    def prunes_all(self, shape, sparsity):
        unit = shape[1] if self.per == "row" else shape[0] * shape[1]
        return _count_to_prune(unit, sparsity) >= unit

    def check(self, mask, sparsity=None):
        if sparsity is None:
            return
        pruned = (~mask).sum(dim=1) if self.per == "row" else (~mask).sum()
        want = _count_to_prune(mask.shape[1] if self.per == "row" else mask.numel(), sparsity)
        if not bool((pruned == want).all()):
            raise PatternViolation(f"{self.name}: expected {want} pruned, got {pruned.tolist()}")


@dataclass(frozen=True)
class NM(Pattern):
    """N:M: in every group of M consecutive input weights of a row, exactly N are kept."""

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise PruneError(f"N:M needs integers 0 < N < M, got {self.n}:{self.m}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.n}:{self.m}"

    @property
    def implied_sparsity(self) -> float:  # type: ignore[override]
        return 1.0 - self.n / self.m

    def validate_shape(self, shape, layer="layer"):
        if shape[1] % self.m:
            raise PruneError(
                f"{layer}: pattern {self.name} needs the input size to be a multiple of {self.m}, "
                f"but the weight has {shape[1]} inputs per row; exclude this layer or use "
                f"another pattern"
            )

    def select(self, scores, sparsity=None):
        self.validate_shape(tuple(scores.shape))
        # one row per group of m: topk over a 2-D view took half the time of a 3-D one
        keep = _smallest_k_mask(scores.reshape(-1, self.m), self.m - self.n, dim=1)
        return keep.reshape(scores.shape)

    def check(self, mask, sparsity=None):
        rows, cols = mask.shape
        if cols % self.m:
            raise PatternViolation(f"{self.name}: {cols} columns is not a multiple of {self.m}")
        kept = mask.reshape(rows, cols // self.m, self.m).sum(dim=2)
        if not bool((kept == self.n).all()):
            raise PatternViolation(f"{self.name}: some group keeps {kept.unique().tolist()}")


@dataclass(frozen=True)
class Block1xN(Pattern):
    """1xN: N consecutive output rows share one keep/drop decision per input index.

    A block is the N x 1 column slice W[b*N:(b+1)*N, j]; its score is the sum of its entries'
    scores, and blocks are compared across the whole layer.
    """

    n: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and self.n >= 1):
            raise PruneError(f"1xN needs an integer N >= 1, got {self.n!r}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"1x{self.n}"

    def validate_shape(self, shape, layer="layer"):
        if shape[0] % self.n:
            raise PruneError(
                f"{layer}: pattern {self.name} needs the output size to be a multiple of "
                f"{self.n}, but the weight has {shape[0]} rows; exclude this layer or use "
                f"another pattern"
            )

    def prunes_all(self, shape, sparsity):
        blocks = (shape[0] // self.n) * shape[1]
        return _count_to_prune(blocks, sparsity) >= blocks

    def block_scores(self, scores: torch.Tensor) -> torch.Tensor:
        rows, cols = scores.shape
        return scores.reshape(rows // self.n, self.n, cols).sum(dim=1)

    def expand(self, block_mask: torch.Tensor) -> torch.Tensor:
        return block_mask.repeat_interleave(self.n, dim=0)

    def select(self, scores, sparsity):
        sparsity = check_sparsity(sparsity)
        self.validate_shape(tuple(scores.shape))
        blocks = self.block_scores(scores)
        keep = _smallest_k_mask(blocks, _count_to_prune(blocks.numel(), sparsity))
        return self.expand(keep)

    def check(self, mask, sparsity=None):
        rows, cols = mask.shape
        if rows % self.n:
            raise PatternViolation(f"{self.name}: {rows} rows is not a multiple of {self.n}")
        blocks = mask.reshape(rows // self.n, self.n, cols)
        if not bool((blocks.all(dim=1) | (~blocks).all(dim=1)).all()):
            raise PatternViolation(f"{self.name}: some block is partly kept")
        if sparsity is not None:
            pruned = int((~blocks[:, 0, :]).sum())
            want = _count_to_prune(blocks[:, 0, :].numel(), sparsity)
            if pruned != want:
                raise PatternViolation(f"{self.name}: expected {want} pruned blocks, got {pruned}")


_NM_RE = re.compile(r"^(\d+):(\d+)$")
_BLOCK_RE = re.compile(r"^1x(\d+)$")


def get_pattern(spec: str | Pattern) -> Pattern:
    """Parse 'unstructured', 'unstructured:row', 'N:M' (e.g. '2:4') or '1xN' (e.g. '1x4')."""
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise PruneError(f"pattern must be a string or Pattern, got {type(spec).__name__}")
    s = spec.strip().lower()
    if s in ("unstructured", "unstructured:layer"):
        return Unstructured("layer")
    if s in ("unstructured:row", "row"):
        return Unstructured("row")
    if m := _NM_RE.match(s):
        return NM(int(m.group(1)), int(m.group(2)))
    if m := _BLOCK_RE.match(s):
        return Block1xN(int(m.group(1)))
    raise PruneError(
        f"unknown pattern {spec!r}; use 'unstructured', 'unstructured:row', 'N:M' such as "
        f"'2:4', or '1xN' such as '1x4'"
    )
