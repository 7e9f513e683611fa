import csv
import dataclasses
import hashlib
import io
import pickle
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch

from prunekit import PruneError, data
from prunekit.data import files
from prunekit.io import read_weights, save_weights

SHARED = data.data_dir(must_exist=False)  # before any test moves PRUNEKIT_DATA


def _shared(name):
    return SHARED / name


def _use_empty(tmp_path, monkeypatch):
    """Point PRUNEKIT_DATA and PRUNEKIT_CACHE at empty temporary folders."""
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def _offline_source(monkeypatch, name, source_path):
    """Point FILES[name] at a local file:// copy of its official source (no network)."""
    entry = dataclasses.replace(files.FILES[name], url=source_path.as_uri(),
                                url_sha256=files.sha256_file(source_path))
    monkeypatch.setitem(files.FILES, name, entry)
    return entry


def test_data_dir_from_env_and_missing_file_message(tmp_path, monkeypatch):
    empty_data = _use_empty(tmp_path, monkeypatch)
    assert data.data_dir() == empty_data
    with pytest.raises(PruneError) as e:
        data.load_stsb("test")
    msg = str(e.value)
    assert "text/stsb_test.tsv" in msg and str(empty_data) in msg and "PRUNEKIT_DATA" in msg
    assert "download=True" in msg and "stsb-en-test.csv" in msg
    monkeypatch.setenv("PRUNEKIT_DATA", str(empty_data / "nope"))
    with pytest.raises(PruneError, match="not a folder"):
        data.data_dir()


def test_default_data_dir_is_shared_data_beside_cwd_then_repo(monkeypatch, tmp_path):
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert data.data_dir() == tmp_path / "shared" / "data"
    monkeypatch.chdir(tmp_path / "shared" / "data")  # none beside the cwd: beside the repo
    beside_repo = files._repo_root().parent / "shared" / "data"
    if beside_repo.is_dir():
        assert data.data_dir() == beside_repo
    else:
        with pytest.raises(PruneError, match="no data folder"):
            data.data_dir()


def test_text_checksum_mismatch_names_file_and_hashes(tmp_path, monkeypatch):
    empty_data = _use_empty(tmp_path, monkeypatch)
    (empty_data / "text").mkdir()
    bad = empty_data / "text" / "stsb_dev.tsv"
    shutil.copy(_shared("text/stsb_dev.tsv"), bad)
    with open(bad, "a") as f:
        f.write("5\tan extra\tline\n")
    with pytest.raises(PruneError) as e:
        data.load_stsb("dev")
    got = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert str(bad) in str(e.value) and got in str(e.value)
    assert files.FILES["text/stsb_dev.tsv"].sha256 in str(e.value)


def test_cifar_checksum_is_of_content_and_names_both_hashes(tmp_path, monkeypatch):
    images, labels = data.load_cifar10("test")
    empty_data = _use_empty(tmp_path, monkeypatch)
    (empty_data / "cifar10").mkdir()
    # same content, other compression: accepted
    np.savez(empty_data / "cifar10" / "test.npz", images=images, labels=labels)
    x, y = data.load_cifar10("test")
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    # one pixel changed: refused, naming the file and both content hashes
    changed = images.copy()
    changed[17, 3, 4, 1] ^= 1
    np.savez(empty_data / "cifar10" / "test.npz", images=changed, labels=labels)
    with pytest.raises(PruneError) as e:
        data.load_cifar10("test")
    msg = str(e.value)
    assert str(empty_data / "cifar10" / "test.npz") in msg
    assert hashlib.sha256(changed.tobytes()).hexdigest() in msg
    assert files.FILES["cifar10/test.npz"].sha256[0] in msg


def test_decoded_arrays_are_cached_and_memory_mapped(tmp_path, monkeypatch):
    images, labels = data.load_cifar10("test")
    empty_data = _use_empty(tmp_path, monkeypatch)
    (empty_data / "cifar10").mkdir()
    np.savez_compressed(empty_data / "cifar10" / "test.npz", images=images, labels=labels)
    first, _ = data.load_cifar10("test")
    key = files.sha256_file(empty_data / "cifar10" / "test.npz")
    assert (tmp_path / "cache" / "decoded" / key / "images.npy").exists()
    files._read_npz.cache_clear()
    again, again_labels = data.load_cifar10("test")
    assert isinstance(again.base, np.memmap) and not again.flags.writeable
    assert np.array_equal(again, images) and np.array_equal(again_labels, labels)


@pytest.mark.data
def test_weights_checksum_mismatch(tmp_path, monkeypatch):
    state = read_weights(_shared("cifar10_resnets/resnet20.safetensors"))
    empty_data = _use_empty(tmp_path, monkeypatch)
    state["linear.bias"] = state["linear.bias"] + 1e-3
    save_weights(state, empty_data / "cifar10_resnets" / "resnet20.safetensors")
    with pytest.raises(PruneError, match="sha256 of the tensors is"):
        data.path_of("cifar10_resnets/resnet20.safetensors")


def test_cifar10_matches_published_facts():
    images, labels = data.load_cifar10("test")
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [1000] * 10
    assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    x, y = data.cifar10_tensors("test", limit=8, normalize="none")
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    assert torch.equal(y, torch.from_numpy(labels[:8].copy()))
    xn, _ = data.cifar10_tensors("test", limit=8)
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(xn, (x - mean) / std)
    with pytest.raises(PruneError, match="split"):
        data.load_cifar10("valid")


def test_calibration_images_come_from_train_and_are_seeded():
    a = data.calibration_images(16, seed=3, normalize="none")
    b = data.calibration_images(16, seed=3, normalize="none")
    c = data.calibration_images(16, seed=4, normalize="none")
    assert torch.equal(a, b) and not torch.equal(a, c)
    train, _ = data.load_cifar10("train")
    test, _ = data.load_cifar10("test")
    as_uint8 = (a.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    flat_train = {im.tobytes() for im in train}
    flat_test = {im.tobytes() for im in test}
    assert all(im.tobytes() in flat_train for im in as_uint8)
    assert not any(im.tobytes() in flat_test for im in as_uint8)
    with pytest.raises(PruneError, match="calibration size"):
        data.calibration_images(0)


def test_augment_cifar_is_a_padded_crop_or_its_mirror():
    images = np.random.default_rng(0).integers(1, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    out = data.augment_cifar(images, seed=5)
    assert np.array_equal(out, data.augment_cifar(images, seed=5))
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for k in range(len(images)):
        hits = [(i, j, f) for i in range(9) for j in range(9) for f in (False, True)
                if np.array_equal(out[k], padded[k, i:i + 32, j:j + 32][:, ::-1] if f
                                  else padded[k, i:i + 32, j:j + 32])]
        assert len(hits) == 1  # pixels are nonzero, so exactly one crop matches
        flips += hits[0][2]
    assert 5 < flips < 35


def test_text_sets():
    test = data.load_stsb("test")
    assert len(test) == 1379 and all(0 <= s <= 5 for _, _, s in test)
    assert test[0] == ("A girl is styling her hair.", "A girl is brushing her hair.", 2.5)
    assert len(data.load_stsb("dev")) == 1500
    valid = data.load_wikitext2("valid")
    assert len(valid.split("\n")) - 1 == 3760
    assert sum(len(line.split()) + 1 for line in valid.split("\n")[:-1]) == 217646
    assert "<unk>" not in data.load_wikitext2("test", raw=True)
    assert len(data.load_tinyshakespeare()) == 1115394
    with pytest.raises(PruneError, match="split"):
        data.load_wikitext2("train")
    with pytest.raises(PruneError, match="split"):
        data.load_wikitext2("valid", raw=True)


def test_calibration_text_is_validation_side_and_seeded():
    from transformers import AutoTokenizer

    from prunekit.models.minilm import minilm_dir
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    a = data.calibration_text(tok, n=8, seq_len=32, seed=1, batch_size=4)
    b = data.calibration_text(tok, n=8, seq_len=32, seed=1, batch_size=4)
    c = data.calibration_text(tok, n=8, seq_len=32, seed=2, batch_size=4)
    assert len(a) == 2 and a[0]["input_ids"].shape == (4, 32)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    def letters(text):
        return re.sub(r"[^a-z0-9]", "", text.lower())

    valid = letters(data.load_wikitext2("valid"))
    test = letters(data.load_wikitext2("test"))
    for batch in a:
        for ids in batch["input_ids"]:
            snippet = letters(tok.decode(ids[1:16]))  # the paragraph's start, no [CLS]
            assert snippet in valid and snippet not in test
    with pytest.raises(PruneError, match="text calibration size"):
        data.calibration_text(tok, n=10**6)


def test_digits_split_is_fixed_and_stratified():
    x, y = data.load_digits("train")
    xt, yt = data.load_digits("test")
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and len(x) + len(xt) == 1797
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(y, data.load_digits("train")[1])
    assert abs(np.bincount(yt.numpy()) - np.bincount(y.numpy()) / 3).max() <= 2
    seen = {r.numpy().tobytes() for r in x}
    assert sum(r.numpy().tobytes() in seen for r in xt) < 5  # a few digits are duplicates


def test_fetch_text_from_source_is_verified_and_resumes(tmp_path, monkeypatch):
    empty_data = _use_empty(tmp_path, monkeypatch)
    src = tmp_path / "input.txt"
    shutil.copy(_shared("text/tinyshakespeare.txt"), src)
    _offline_source(monkeypatch, "text/tinyshakespeare.txt", src)
    with pytest.raises(PruneError, match="not found"):
        data.load_tinyshakespeare()
    text = data.load_tinyshakespeare(download=True)
    assert (empty_data / "text" / "tinyshakespeare.txt").exists() and len(text) == 1115394
    # the raw download is kept: fetching again needs no source
    (empty_data / "text" / "tinyshakespeare.txt").unlink()
    src.unlink()
    assert data.load_tinyshakespeare(download=True) == text


def test_fetch_refuses_a_download_with_the_wrong_hash(tmp_path, monkeypatch):
    empty_data = _use_empty(tmp_path, monkeypatch)
    src = tmp_path / "input.txt"
    src.write_text("not shakespeare")
    entry = _offline_source(monkeypatch, "text/tinyshakespeare.txt", src)
    monkeypatch.setitem(files.FILES, entry.name, dataclasses.replace(entry, url_sha256="0" * 64))
    with pytest.raises(PruneError, match="expected 0000"):
        data.fetch("text/tinyshakespeare.txt")
    assert not (empty_data / "text").exists()
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_fetch_converts_stsb_csv_and_crlf_text(tmp_path, monkeypatch):
    pairs = data.load_stsb("dev")  # from the shared folder, before PRUNEKIT_DATA moves
    raw_test = _shared("text/wikitext2_raw_test.txt").read_bytes()
    _use_empty(tmp_path, monkeypatch)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows((a, b, repr(s)) for a, b, s in pairs)
    (tmp_path / "dev.csv").write_text(buf.getvalue(), encoding="utf-8")
    (tmp_path / "raw.txt").write_bytes(raw_test.replace(b"\n", b"\r\n"))
    _offline_source(monkeypatch, "text/stsb_dev.tsv", tmp_path / "dev.csv")
    _offline_source(monkeypatch, "text/wikitext2_raw_test.txt", tmp_path / "raw.txt")
    assert data.load_stsb("dev", download=True) == pairs
    assert data.load_wikitext2("test", raw=True, download=True).encode() == raw_test


def test_fetch_converts_official_cifar_archive(tmp_path, monkeypatch):
    images, labels = data.load_cifar10("test")
    empty_data = _use_empty(tmp_path, monkeypatch)
    blob = pickle.dumps({b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                         b"labels": labels.tolist()})
    with tarfile.open(tmp_path / "cifar-10-python.tar", "w") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    _offline_source(monkeypatch, "cifar10/test.npz", tmp_path / "cifar-10-python.tar")
    x, y = data.load_cifar10("test", download=True)
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    with np.load(empty_data / "cifar10" / "test.npz") as z:
        assert list(z["classes"]) == list(data.CIFAR10_CLASSES)


@pytest.mark.data
def test_fetch_converts_akamaster_checkpoint(tmp_path, monkeypatch):
    from collections import OrderedDict
    state = read_weights(_shared("cifar10_resnets/resnet20.safetensors"))
    empty_data = _use_empty(tmp_path, monkeypatch)
    ckpt = {"epoch": 200, "best_prec1": 91.78,
            "state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items())}
    torch.save(ckpt, tmp_path / "resnet20-12fca82f.th")
    _offline_source(monkeypatch, "cifar10_resnets/resnet20.safetensors",
                    tmp_path / "resnet20-12fca82f.th")
    path = data.path_of("cifar10_resnets/resnet20.safetensors", download=True)
    assert path.parent.parent == empty_data
    got = read_weights(path)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_unknown_data_file():
    with pytest.raises(PruneError, match="unknown data file"):
        data.path_of("cifar100/test.npz")
