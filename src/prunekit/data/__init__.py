"""Real datasets: CIFAR-10, STS Benchmark, WikiText-2, TinyShakespeare, scikit-learn digits.

Files are looked up in `data_dir()`: $PRUNEKIT_DATA, else ../shared/data from the working
directory or from the repository. Every file is checked against its sha256 before use. For
users elsewhere, `fetch(name)` downloads a file from its official source into the data
folder (checksum verified, written atomically); nothing here touches the network unless
asked. Calibration draws come from train or validation splits only, seeded.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch

from prunekit.errors import PruneError
from prunekit.io import atomic_write

#: relative path -> (sha256 of the file, official source URL or how to obtain it)
FILES = {
    "cifar10/test.npz": (
        "bd6b06b8ad10a807755b482ea896a08ba8c9e30a5508607e11a53db5ae08ad9a",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (convert with "
        "prunekit.data.cifar10_from_tarball)"),
    "cifar10/train.npz": (
        "9082e55bdbf0a7eaff432a7f1b4fbacab3250ce411b697219ea95226a7bcbe6f",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (convert with "
        "prunekit.data.cifar10_from_tarball)"),
    "text/stsb_test.tsv": (
        "3b7e85852de7a4372e469a983b79f9ba453c75f4f65806c4405945f697f53f40",
        "https://raw.githubusercontent.com/PhilipMay/stsb-multi-mt/"
        "30de0dec4ee199b7f42351d3f1a0b19592955385/data/stsb-en-test.csv"),
    "text/stsb_dev.tsv": (
        "9250f014f8855b43e8a9114c8d35bfd00660d1fc1d60f9e80d2dac058016ae77",
        "https://raw.githubusercontent.com/PhilipMay/stsb-multi-mt/"
        "30de0dec4ee199b7f42351d3f1a0b19592955385/data/stsb-en-dev.csv"),
    "text/wikitext2_valid.txt": (
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "https://raw.githubusercontent.com/pytorch/examples/"
        "77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/wikitext-2/valid.txt"),
    "text/wikitext2_test.txt": (
        "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        "https://raw.githubusercontent.com/pytorch/examples/"
        "77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/wikitext-2/test.txt"),
    "text/wikitext2_raw_test.txt": (
        "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
        "wikitext-2-raw-v1 test split (wiki.test.raw) with CRLF turned into LF"),
    "text/tinyshakespeare.txt": (
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "https://raw.githubusercontent.com/karpathy/char-rnn/"
        "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt"),
    "cifar10_resnets/resnet20.safetensors": (
        "69e14372fdfb1095050da1eb71b22890dcb2af74673dcf4f49c97e21bf1f8a61",
        "akamaster/pytorch_resnet_cifar10 pretrained_models/resnet20-12fca82f.th, converted "
        "to safetensors (prunekit.models.convert_akamaster)"),
    "cifar10_resnets/resnet32.safetensors": (
        "320e8cc46983e256c814d4f58783afee62b1ccba3c87e9b0e37fd7a429433f2d",
        "akamaster/pytorch_resnet_cifar10 pretrained_models/resnet32-d509ac18.th, converted"),
    "cifar10_resnets/resnet44.safetensors": (
        "cbf1f1773da0d491a5179690e22bb3247e844914cb2c4f541433f5c66ed6e3e1",
        "akamaster/pytorch_resnet_cifar10 pretrained_models/resnet44-014dd654.th, converted"),
    "cifar10_resnets/resnet56.safetensors": (
        "3a0ffd5e1c17c1d9613eef00af3392e61a4fa82bf1374ac33dfb64fa6eb5e2e2",
        "akamaster/pytorch_resnet_cifar10 pretrained_models/resnet56-4bfd9763.th, converted"),
}
#: Files whose official copy converts byte for byte (a CSV needs a conversion to TSV).
_DIRECT = ("text/wikitext2_valid.txt", "text/wikitext2_test.txt", "text/tinyshakespeare.txt")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def data_dir(must_exist: bool = True) -> Path:
    """$PRUNEKIT_DATA, else ../shared/data beside the working directory or the repository."""
    env = os.environ.get("PRUNEKIT_DATA")
    if env:
        path = Path(env)
    else:
        repo = Path(__file__).resolve().parents[3]
        candidates = [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]
        path = next((c for c in candidates if c.is_dir()), candidates[0])
    if must_exist and not path.is_dir():
        raise PruneError(
            f"data folder {path} does not exist; set PRUNEKIT_DATA to a folder holding the "
            f"files listed in prunekit.data.FILES, or call prunekit.data.fetch(name)")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@cache
def _verified(path: Path, size: int, mtime: float) -> str:
    return _sha256(path)


def path_of(name: str) -> Path:
    """The checked path of a data file (relative name as in FILES)."""
    want, source = FILES[name]
    folder = data_dir(must_exist=False)
    path = folder / name
    if not path.exists():
        raise PruneError(
            f"data file {name} not found in {folder} (set PRUNEKIT_DATA to the folder holding "
            f"it); put it at {path}. Source: {source}")
    st = path.stat()
    got = _verified(path, st.st_size, st.st_mtime)
    if got != want:
        raise PruneError(f"{path}: sha256 is {got} but should be {want}; the file is corrupt "
                         f"or another version: fetch it again")
    return path


def fetch(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Download a text file from its official source into the data folder, verified."""
    if name not in _DIRECT:
        raise PruneError(f"{name} cannot be downloaded as is; obtain it from: {FILES[name][1]}")
    want, url = FILES[name]
    target = Path(folder or data_dir(must_exist=False)) / name
    with urllib.request.urlopen(url, timeout=60) as r:
        blob = r.read()
    got = hashlib.sha256(blob).hexdigest()
    if got != want:
        raise PruneError(f"download of {url} has sha256 {got}, expected {want}")
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(blob))
    return target


def cifar10_from_tarball(tarball: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Convert the official cifar-10-python.tar.gz into test.npz / train.npz (the layout
    read here: uint8 NHWC images, int64 labels, class names)."""
    import pickle
    import tarfile

    classes = np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                        "horse", "ship", "truck"])
    with tarfile.open(tarball) as tar:
        def batch(member):
            d = pickle.load(tar.extractfile(f"cifar-10-batches-py/{member}"), encoding="bytes")
            imgs = d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return imgs, np.array(d[b"labels"], dtype=np.int64)
        for split, members in (("test", ["test_batch"]),
                               ("train", [f"data_batch_{i}" for i in range(1, 6)])):
            parts = [batch(m) for m in members]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            buf = io.BytesIO()
            np.savez_compressed(buf, images=images, labels=labels, classes=classes)
            target = Path(folder) / "cifar10" / f"{split}.npz"
            atomic_write(target, lambda tmp, b=buf: Path(tmp).write_bytes(b.getvalue()))


@lru_cache(maxsize=2)
def load_cifar10(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 as (uint8 images (N, 32, 32, 3), int64 labels (N,))."""
    if split not in ("train", "test"):
        raise PruneError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    with np.load(path_of(f"cifar10/{split}.npz")) as z:
        images, labels = z["images"], z["labels"]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _normalize(images: np.ndarray, normalize: str) -> torch.Tensor:
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0
    if normalize == "none":
        return x
    mean, std = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                 "cifar": (CIFAR_MEAN, CIFAR_STD)}.get(normalize, (None, None))
    if mean is None:
        raise PruneError(f"normalize must be 'imagenet', 'cifar' or 'none', got {normalize!r}")
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def cifar10_tensors(split: str = "test", normalize: str = "imagenet", limit: int | None = None):
    """CIFAR-10 as (float images (N, 3, 32, 32), int64 labels), normalised for the ResNets
    (they were trained with ImageNet statistics). limit takes the first N images."""
    images, labels = load_cifar10(split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return _normalize(images, normalize), torch.from_numpy(labels.copy())


def calibration_images(n: int = 128, seed: int = 0, normalize: str = "imagenet"):
    """n CIFAR-10 training images drawn without replacement, reproducibly by seed."""
    images, _ = load_cifar10("train")
    if not 0 < n <= len(images):
        raise PruneError(f"calibration size must be in 1..{len(images)}, got {n}")
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return _normalize(images[np.sort(idx)], normalize)


def load_stsb(split: str = "test") -> list[tuple[str, str, float]]:
    """STS Benchmark pairs (sentence1, sentence2, gold score in [0, 5])."""
    if split not in ("dev", "test"):
        raise PruneError(f"STS-B split must be 'dev' or 'test', got {split!r}")
    lines = path_of(f"text/stsb_{split}.tsv").read_text(encoding="utf-8").splitlines()
    pairs = []
    for line in lines[1:]:
        score, s1, s2 = line.split("\t")
        pairs.append((s1, s2, float(score)))
    return pairs


def load_wikitext2(split: str = "valid", raw: bool = False) -> str:
    """WikiText-2 text: tokenized v1 'valid'/'test', or raw 'test' with raw=True."""
    if raw:
        if split != "test":
            raise PruneError("only the raw test split of WikiText-2 is available")
        return path_of("text/wikitext2_raw_test.txt").read_text(encoding="utf-8")
    if split not in ("valid", "test"):
        raise PruneError(f"WikiText-2 split must be 'valid' or 'test', got {split!r}")
    return path_of(f"text/wikitext2_{split}.txt").read_text(encoding="utf-8")


def load_tinyshakespeare() -> str:
    return path_of("text/tinyshakespeare.txt").read_text(encoding="utf-8")


def load_digits(split: str = "train", seed: int = 0):
    """scikit-learn's bundled 8x8 digits as (float (N, 1, 8, 8) in [0, 1], int64 labels);
    a fixed stratified 75/25 train/test split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise PruneError(f"digits split must be 'train' or 'test', got {split!r}")
    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)
    tr_x, te_x, tr_y, te_y = train_test_split(x, d.target, test_size=0.25, random_state=seed,
                                              stratify=d.target)
    x, y = (tr_x, tr_y) if split == "train" else (te_x, te_y)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def calibration_text(tokenizer, n: int = 128, seq_len: int = 128, seed: int = 0,
                     batch_size: int = 16) -> list[dict]:
    """n windows of seq_len tokens from WikiText-2 validation (never test), seeded; batches
    of {'input_ids', 'attention_mask'}."""
    text = load_wikitext2("valid")
    paragraphs = [p.strip() for p in text.split("\n") if len(p.strip()) > 200]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paragraphs), size=min(n, len(paragraphs)), replace=False)
    enc = tokenizer([paragraphs[i] for i in chosen], truncation=True, max_length=seq_len,
                    padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": mask[i:i + batch_size]}
            for i in range(0, len(ids), batch_size)]
