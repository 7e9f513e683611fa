"""Where the data files live, how they are checked, and how to get them.

Each file has an official source and a checksum. Files are looked up in `data_dir()`
($PRUNEKIT_DATA, else ../shared/data) and then in the download cache; a missing file is an
error that says where to put it, unless the caller asks for `download=True`, which fetches
the official source, converts it to the layout read here, verifies it and writes it
atomically. CIFAR-10 and the ResNet weights are checked by content (array and tensor bytes),
so a user's own conversion of the official archive verifies the same as the shared copy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from prunekit.errors import PruneError
from prunekit.io import atomic_write, tensors_sha256
from prunekit.progress import Progress

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: sha256 of the official archive (its md5, published on the CIFAR page, is
#: c58f30108f718f92721af3b95e74349a).
_CIFAR_SHA = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_GH = "https://raw.githubusercontent.com"
_AKAMASTER = f"{_GH}/akamaster/pytorch_resnet_cifar10/d5489e8995e81e91ce6b1d69dcc98ad579b0b153"
_STSB = f"{_GH}/PhilipMay/stsb-multi-mt/30de0dec4ee199b7f42351d3f1a0b19592955385/data"
_WT2 = (f"{_GH}/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
        f"word_language_model/data/wikitext-2")


@dataclass(frozen=True)
class DataFile:
    """One file of the data folder: its checksum, and how to obtain it from the official
    source (url, that download's sha256, and the conversion to this layout)."""

    name: str
    check: str  # "file": sha256 of the bytes; "npz": images/labels bytes; "tensors": weights
    sha256: str | tuple[str, str]
    url: str
    url_sha256: str | None
    convert: str  # copy | crlf | stsb_csv | cifar_test | cifar_train | akamaster
    note: str = ""


def _entries() -> dict[str, DataFile]:
    files = [
        DataFile("cifar10/test.npz", "npz",
                 ("f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
                  "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb"),
                 _CIFAR_URL, _CIFAR_SHA, "cifar_test"),
        DataFile("cifar10/train.npz", "npz",
                 ("47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
                  "f5cfe00b0f00968c0cc5ff3b1d2de51b10e33efa277c2986f4e0fa63e58c9f4f"),
                 _CIFAR_URL, _CIFAR_SHA, "cifar_train"),
        DataFile("text/stsb_test.tsv", "file",
                 "3b7e85852de7a4372e469a983b79f9ba453c75f4f65806c4405945f697f53f40",
                 f"{_STSB}/stsb-en-test.csv", None, "stsb_csv"),
        DataFile("text/stsb_dev.tsv", "file",
                 "9250f014f8855b43e8a9114c8d35bfd00660d1fc1d60f9e80d2dac058016ae77",
                 f"{_STSB}/stsb-en-dev.csv", None, "stsb_csv"),
        DataFile("text/wikitext2_valid.txt", "file",
                 "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                 f"{_WT2}/valid.txt", None, "copy"),
        DataFile("text/wikitext2_test.txt", "file",
                 "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                 f"{_WT2}/test.txt", None, "copy"),
        DataFile("text/wikitext2_raw_test.txt", "file",
                 "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
                 f"{_GH}/Tylogi/TyloQuant/7989d038b13ca737da11a95fb90e77ae059f33c0/"
                 f"data/wikitext-2-raw/wiki.test.raw",
                 "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c", "crlf",
                 "wikitext-2-raw-v1 test split, paragraphs only, CRLF turned into LF"),
        DataFile("text/tinyshakespeare.txt", "file",
                 "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                 f"{_GH}/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
                 f"data/tinyshakespeare/input.txt", None, "copy"),
    ]
    weights = {
        20: ("12fca82f", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
             "74fb730ff28acdd04f94f7376bf4b586cb6a16428e4f4f250aa2939ffb518177"),
        32: ("d509ac18", "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
             "d6157e5bc6a5d57f7ad3832ab0b71a02c88c65a1d17cf56be7b93cc1df931dd5"),
        44: ("014dd654", "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
             "5b534f1ee032b7e7495d3349a97891bae304e70fe38fcb13a02b4f8da2f7bdfc"),
        56: ("4bfd9763", "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
             "1233656779d280332395857855c707b7edc0576814915a8bb44305d1202e3b3f"),
    }
    for depth, (tag, url_sha, content_sha) in weights.items():
        files.append(DataFile(
            f"cifar10_resnets/resnet{depth}.safetensors", "tensors", content_sha,
            f"{_AKAMASTER}/pretrained_models/resnet{depth}-{tag}.th", url_sha, "akamaster",
            "BSD-2-Clause, Copyright (c) 2018 Yerlan Idelbayev (akamaster/pytorch_resnet_cifar10)"))
    return {f.name: f for f in files}


#: Every known data file, by its path relative to the data folder.
FILES: dict[str, DataFile] = _entries()


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def data_dir(must_exist: bool = True) -> Path:
    """$PRUNEKIT_DATA, else ../shared/data relative to the working directory, then relative
    to the repository holding this package."""
    env = os.environ.get("PRUNEKIT_DATA")
    if env:
        path = Path(env).expanduser()
        if must_exist and not path.is_dir():
            raise PruneError(f"PRUNEKIT_DATA is {env}, which is not a folder; point it at the "
                             f"folder that holds cifar10/, cifar10_resnets/ and text/")
        return path
    candidates = [Path.cwd().parent / "shared" / "data", _repo_root().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    if must_exist:
        raise PruneError(
            f"no data folder: PRUNEKIT_DATA is not set and none of "
            f"{', '.join(map(str, candidates))} exists; set PRUNEKIT_DATA to a folder for the "
            f"files (cifar10/, cifar10_resnets/, "
            f"text/) or load with download=True to fetch them into {cache_dir() / 'data'}")
    return candidates[0]


def cache_dir() -> Path:
    """Where prunekit keeps downloads and trained weights: $PRUNEKIT_CACHE or
    ~/.cache/prunekit."""
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def _download_dir() -> Path:
    env = os.environ.get("PRUNEKIT_DATA")
    return Path(env).expanduser() if env else cache_dir() / "data"


def _search_dirs() -> list[Path]:
    dirs = [data_dir(must_exist=False), cache_dir() / "data"]
    return list(dict.fromkeys(dirs))


def _entry(name: str) -> DataFile:
    try:
        return FILES[name]
    except KeyError:
        raise PruneError(f"unknown data file {name!r}; known: {', '.join(FILES)}") from None


def path_of(name: str, download: bool = False) -> Path:
    """The verified path of a data file (a name of FILES); with download=True a missing file
    is fetched from its official source first."""
    entry = _entry(name)
    path = next((d / name for d in _search_dirs() if (d / name).exists()), None)
    if path is None:
        if not download:
            searched = " and ".join(str(d) for d in _search_dirs())
            raise PruneError(
                f"data file {name} not found (searched {searched}). Put it at "
                f"{data_dir(must_exist=False) / name} or set PRUNEKIT_DATA to the folder that "
                f"holds {name}; or pass download=True to fetch it from {entry.url} into "
                f"{_download_dir()}")
        path = fetch(name)
    verify(path, entry)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=4)
def _read_npz(path: Path, size: int, mtime: float) -> tuple[np.ndarray, np.ndarray]:
    # Decoding the LZMA-compressed train set takes seconds; a decoded copy in the cache,
    # keyed by the file's sha256 and memory-mapped, makes later processes start at once.
    decoded = cache_dir() / "decoded" / sha256_file(path)
    if (decoded / "images.npy").exists() and (decoded / "labels.npy").exists():
        try:
            return (np.asarray(np.load(decoded / "images.npy", mmap_mode="r")),
                    np.asarray(np.load(decoded / "labels.npy", mmap_mode="r")))
        except (OSError, ValueError):
            pass  # unreadable cache: decode again below
    with np.load(path) as z:
        images, labels = z["images"], z["labels"]
    try:
        for name, array in (("images", images), ("labels", labels)):
            atomic_write(decoded / f"{name}.npy", lambda tmp, a=array: _save_npy(tmp, a))
    except OSError:
        pass  # no writable cache: fine, just slower next time
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a CIFAR-10 .npz, cached per file version."""
    st = path.stat()
    try:
        return _read_npz(path, st.st_size, st.st_mtime)
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise PruneError(f"{path} is not a readable CIFAR-10 .npz with images and labels "
                         f"({e}); fetch it again") from e


@lru_cache(maxsize=64)
def _digest(path: Path, size: int, mtime: float, check: str) -> str | tuple[str, str]:
    if check == "file":
        return sha256_file(path)
    if check == "npz":
        images, labels = read_npz(path)
        return (hashlib.sha256(images.tobytes()).hexdigest(),
                hashlib.sha256(labels.tobytes()).hexdigest())
    from safetensors.torch import load_file
    try:
        tensors = load_file(path)
    except Exception as e:
        raise PruneError(f"{path} is not a readable safetensors file ({e}); fetch it again") \
            from e
    return tensors_sha256(tensors)


def verify(path: Path, entry: DataFile) -> None:
    """Raise PruneError naming the file and both hashes when its checksum is wrong."""
    st = path.stat()
    got = _digest(path, st.st_size, st.st_mtime, entry.check)
    if got != entry.sha256:
        what = {"file": "sha256", "npz": "sha256 of (images, labels) bytes",
                "tensors": "sha256 of the tensors"}[entry.check]
        raise PruneError(f"{path}: {what} is {_fmt(got)} but should be {_fmt(entry.sha256)}; "
                         f"the file is corrupt or another version: delete it and fetch it again "
                         f"from {entry.url}")


def _fmt(h) -> str:
    return h if isinstance(h, str) else f"({h[0]}, {h[1]})"


def download_url(url: str, target: Path, sha256: str | None = None, quiet: bool = False) -> Path:
    """Stream url into target atomically, checking its sha256 when given; an existing target
    with the right hash is reused (an interrupted fetch resumes without downloading again)."""
    if target.exists() and sha256 and sha256_file(target) == sha256:
        return target

    def write(tmp):
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f, \
                    Progress(enabled=not quiet) as bar:
                total = int(r.headers.get("Content-Length") or 0) or None
                task = bar.add(f"download {Path(url).name}", total=total)
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    h.update(chunk)
                    bar.advance(task, len(chunk))
        except OSError as e:
            raise PruneError(f"could not download {url}: {e}") from e
        if sha256 and h.hexdigest() != sha256:
            raise PruneError(f"download of {url} has sha256 {h.hexdigest()}, expected {sha256}")
    return atomic_write(target, write)


def fetch(name: str, folder: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Download a data file from its official source, convert it to the layout prunekit
    reads, verify it and write it atomically into folder ($PRUNEKIT_DATA or the cache)."""
    entry = _entry(name)
    folder = Path(folder) if folder is not None else _download_dir()
    target = folder / name
    raw = cache_dir() / "downloads" / Path(entry.url).name
    download_url(entry.url, raw, entry.url_sha256, quiet=quiet)

    def write(tmp):
        convert(entry, raw, Path(tmp))
        verify(Path(tmp), entry)
    atomic_write(target, write)
    return target


def convert(entry: DataFile, source: Path, out: Path) -> None:
    """Turn the official download `source` into this layout at `out`."""
    if entry.convert == "copy":
        shutil.copyfile(source, out)
    elif entry.convert == "crlf":
        out.write_bytes(source.read_bytes().replace(b"\r\n", b"\n"))
    elif entry.convert == "stsb_csv":
        out.write_text(stsb_csv_to_tsv(source.read_text(encoding="utf-8")), encoding="utf-8")
    elif entry.convert in ("cifar_test", "cifar_train"):
        images, labels = cifar10_from_tarball(source, entry.convert.split("_")[1])
        buf = io.BytesIO()
        np.savez_compressed(buf, images=images, labels=labels, classes=np.array(CIFAR10_CLASSES))
        out.write_bytes(buf.getvalue())
    elif entry.convert == "akamaster":
        convert_akamaster(source, out)
    else:
        raise PruneError(f"{entry.name}: no conversion {entry.convert!r}")


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def cifar10_from_tarball(tarball: str | os.PathLike, split: str):
    """(uint8 NHWC images, int64 labels) of a split of the official cifar-10-python.tar.gz,
    in the original order (train is data_batch_1..5)."""
    import pickle
    import tarfile

    members = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    images, labels = [], []
    with tarfile.open(tarball) as tar:
        for m in members:
            # The official archive is a pickle of plain arrays and lists; its checksum was
            # verified before this point.
            d = pickle.load(tar.extractfile(f"cifar-10-batches-py/{m}"), encoding="bytes")
            images.append(np.asarray(d[b"data"], dtype=np.uint8)
                          .reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(d[b"labels"], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def stsb_csv_to_tsv(text: str) -> str:
    """PhilipMay/stsb-multi-mt CSV (sentence1,sentence2,score; quoted where needed) to the
    TSV read here: a header, then score (%g), sentence1, sentence2."""
    lines = ["score\tsentence1\tsentence2"]
    for row in csv.reader(io.StringIO(text)):
        if not row:
            continue
        s1, s2, score = row
        lines.append(f"{float(score):g}\t{s1}\t{s2}")
    return "\n".join(lines) + "\n"


def convert_akamaster(checkpoint: str | os.PathLike, out: str | os.PathLike) -> None:
    """An akamaster/pytorch_resnet_cifar10 .th checkpoint as clean safetensors (the
    DataParallel 'module.' prefix removed). Read with torch's weights-only loader, which
    refuses code."""
    import torch

    from prunekit.io import save_weights

    obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj)
    state = {k.removeprefix("module."): v.float() for k, v in state.items()
             if not k.endswith("num_batches_tracked")}
    meta = {"source": f"akamaster/pytorch_resnet_cifar10 {Path(checkpoint).name}",
            "license": "BSD-2-Clause, Copyright (c) 2018 Yerlan Idelbayev"}
    save_weights(state, out, metadata=meta)
