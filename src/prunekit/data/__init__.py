"""Real datasets: CIFAR-10, STS Benchmark, WikiText-2, TinyShakespeare, scikit-learn digits;
language-model text and calibration segments in `prunekit.data.text`.

Files are found in `data_dir()` ($PRUNEKIT_DATA, else ../shared/data) and checked against
their sha256 before use; `download=True` fetches a missing file from its official source
(see `prunekit.data.files`). Calibration draws come from the train or validation side only,
reproducibly by seed; the test side is for evaluation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from prunekit.data.files import (
    CIFAR10_CLASSES,
    FILES,
    DataFile,
    cache_dir,
    cifar10_from_tarball,
    convert_akamaster,
    data_dir,
    fetch,
    path_of,
    read_npz,
    stsb_csv_to_tsv,
)
from prunekit.data.text import (
    LM_SPLITS,
    calibration_segments,
    lm_text,
    lm_tokens,
    tokenize_stream,
    wikitext2_test_rows,
)
from prunekit.errors import PruneError

__all__ = [
    "CIFAR10_CLASSES", "FILES", "DataFile", "cache_dir", "cifar10_from_tarball",
    "convert_akamaster", "data_dir", "fetch", "path_of", "stsb_csv_to_tsv", "load_cifar10",
    "cifar10_tensors", "augment_cifar", "calibration_images", "load_stsb", "load_wikitext2",
    "load_tinyshakespeare", "load_digits", "calibration_text", "calibration_sentences",
    "IMAGENET_MEAN", "IMAGENET_STD", "LM_SPLITS", "calibration_segments", "lm_text", "lm_tokens",
    "tokenize_stream", "wikitext2_test_rows",
    "CIFAR_MEAN", "CIFAR_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _split(kind: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise PruneError(f"{kind} split must be one of {', '.join(map(repr, allowed))}, "
                         f"got {split!r}")


def load_cifar10(split: str = "train", download: bool = False):
    """CIFAR-10 as (uint8 images (N, 32, 32, 3) NHWC RGB, int64 labels (N,)), read-only
    arrays in the original order, content-checked and cached."""
    _split("CIFAR-10", split, ("train", "test"))
    return read_npz(path_of(f"cifar10/{split}.npz", download))


def _normalize(images: np.ndarray, normalize: str) -> torch.Tensor:
    stats = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "cifar": (CIFAR_MEAN, CIFAR_STD),
             "none": None}
    if normalize not in stats:
        raise PruneError(f"normalize must be 'imagenet', 'cifar' or 'none', got {normalize!r}")
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if stats[normalize] is None:
        return x.contiguous()
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in stats[normalize])
    return ((x - mean) / std).contiguous()


def cifar10_tensors(split: str = "test", normalize: str = "imagenet", limit: int | None = None,
                    download: bool = False):
    """CIFAR-10 as (float32 (N, 3, 32, 32), int64 (N,)) tensors. The default normalisation is
    ImageNet's mean/std, the one the pretrained ResNets were trained with; limit keeps the
    first N images."""
    images, labels = load_cifar10(split, download)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return _normalize(images, normalize), torch.from_numpy(labels.copy())


def augment_cifar(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The CIFAR training augmentation (He et al. 2016): pad 4 black pixels on each side,
    take a random 32x32 crop, flip half of the images horizontally; uint8 NHWC in and out."""
    rng = np.random.default_rng(seed)
    n = len(images)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = rng.integers(0, 9, size=(n, 2))
    flip = rng.random(n) < 0.5
    out = np.empty_like(images)
    for k in range(n):
        i, j = offsets[k]
        crop = padded[k, i:i + 32, j:j + 32]
        out[k] = crop[:, ::-1] if flip[k] else crop
    return out


def calibration_images(n: int = 128, seed: int = 0, normalize: str = "imagenet",
                       augment: bool = False, download: bool = False) -> torch.Tensor:
    """n CIFAR-10 TRAIN images, drawn without replacement by seed (in file order). With
    augment=True they get the training augmentation (augment_cifar): use that for batch-norm
    re-estimation, since the pretrained ResNets' statistics were learnt on augmented images
    (plain images shift them and cost ResNet-20 about 3 points of top-1)."""
    images, _ = load_cifar10("train", download)
    if not 0 < n <= len(images):
        raise PruneError(f"calibration size must be in 1..{len(images)}, got {n}")
    idx = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
    picked = augment_cifar(images[idx], seed) if augment else images[idx]
    return _normalize(picked, normalize)


def load_stsb(split: str = "test", download: bool = False) -> list[tuple[str, str, float]]:
    """STS Benchmark pairs (sentence1, sentence2, gold similarity in [0, 5])."""
    _split("STS-B", split, ("dev", "test"))
    path = path_of(f"text/stsb_{split}.tsv", download)
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 3:
            raise PruneError(f"{path}:{i}: expected score<TAB>sentence1<TAB>sentence2")
        pairs.append((parts[1], parts[2], float(parts[0])))
    return pairs


def load_wikitext2(split: str = "valid", raw: bool = False, download: bool = False) -> str:
    """WikiText-2 text: the tokenized (v1) 'valid' or 'test' split, or with raw=True the raw
    test split (only that one is available raw)."""
    if raw:
        _split("raw WikiText-2", split, ("test",))
        return path_of("text/wikitext2_raw_test.txt", download).read_text(encoding="utf-8")
    _split("WikiText-2", split, ("valid", "test"))
    return path_of(f"text/wikitext2_{split}.txt", download).read_text(encoding="utf-8")


def load_tinyshakespeare(download: bool = False) -> str:
    """Tiny Shakespeare (char-rnn), 1,115,394 characters."""
    return path_of("text/tinyshakespeare.txt", download).read_text(encoding="utf-8")


@lru_cache(maxsize=2)
def _digits(seed: int):
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)
    return train_test_split(x, d.target.astype(np.int64), test_size=0.25, random_state=seed,
                            stratify=d.target)


def load_digits(split: str = "train", seed: int = 0):
    """scikit-learn's bundled 8x8 digits (no file needed) as (float32 (N, 1, 8, 8) in [0, 1],
    int64 labels), with a fixed stratified 75/25 train/test split."""
    _split("digits", split, ("train", "test"))
    tr_x, te_x, tr_y, te_y = _digits(seed)
    x, y = (tr_x, tr_y) if split == "train" else (te_x, te_y)
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.copy())


def calibration_text(tokenizer, n: int = 128, seq_len: int = 128, seed: int = 0,
                     batch_size: int = 16, download: bool = False) -> list[dict]:
    """n WikiText-2 VALIDATION paragraphs (never test) of more than 200 characters, drawn by
    seed and tokenized to seq_len tokens (truncated or padded); batches of
    {'input_ids', 'attention_mask'}."""
    text = load_wikitext2("valid", download=download)
    paragraphs = [p.strip() for p in text.split("\n") if len(p.strip()) > 200]
    if not 0 < n <= len(paragraphs):
        raise PruneError(f"text calibration size must be in 1..{len(paragraphs)} (the long "
                         f"paragraphs of WikiText-2 validation), got {n}")
    chosen = np.random.default_rng(seed).choice(len(paragraphs), size=n, replace=False)
    enc = tokenizer([paragraphs[i] for i in chosen], truncation=True, max_length=seq_len,
                    padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": mask[i:i + batch_size]}
            for i in range(0, len(ids), batch_size)]


def calibration_sentences(tokenizer, n: int = 512, seed: int = 0, batch_size: int = 32,
                          max_length: int = 128, download: bool = False) -> list[dict]:
    """n distinct STS-B DEV sentences (the validation side, never test), drawn by seed;
    batches of {'input_ids', 'attention_mask'} padded per batch (padding tokens do not count
    in calibration statistics). In-domain calibration for sentence encoders."""
    import random

    dev = sorted({s for a, b, _ in load_stsb("dev", download=download) for s in (a, b)})
    if not 0 < n <= len(dev):
        raise PruneError(f"sentence calibration size must be in 1..{len(dev)}, got {n}")
    chosen = random.Random(seed).sample(dev, n)
    batches = []
    for i in range(0, n, batch_size):
        enc = tokenizer(chosen[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches
