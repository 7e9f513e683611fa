import hashlib
import shutil

import numpy as np
import pytest
import torch

from prunekit import PruneError, data


def test_data_dir_from_env_and_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path
    with pytest.raises(PruneError) as e:
        data.load_stsb("test")
    msg = str(e.value)
    assert "text/stsb_test.tsv" in msg and str(tmp_path) in msg and "PRUNEKIT_DATA" in msg
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path / "nope"))
    with pytest.raises(PruneError, match="does not exist"):
        data.data_dir()


def test_checksum_mismatch_names_file_and_hashes(tmp_path, monkeypatch):
    src = data.path_of("text/stsb_dev.tsv")
    (tmp_path / "text").mkdir()
    bad = tmp_path / "text" / "stsb_dev.tsv"
    shutil.copy(src, bad)
    with open(bad, "a") as f:
        f.write("5\tan extra\tline\n")
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    with pytest.raises(PruneError) as e:
        data.load_stsb("dev")
    got = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert str(bad) in str(e.value) and got in str(e.value)
    assert data.FILES["text/stsb_dev.tsv"][0] in str(e.value)


def test_cifar10_matches_published_facts():
    images, labels = data.load_cifar10("test")
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert hashlib.sha256(labels.tobytes()).hexdigest() == (
        "cbb7365de8ed11f05cc4c3a1e7f78144127c5e851efd83762fb18202461230bb")
    x, y = data.cifar10_tensors("test", limit=8, normalize="none")
    assert x.shape == (8, 3, 32, 32) and float(x.max()) <= 1.0
    assert torch.equal(y, torch.from_numpy(labels[:8].copy()))


def test_calibration_images_come_from_train_and_are_seeded():
    a = data.calibration_images(16, seed=3, normalize="none")
    b = data.calibration_images(16, seed=3, normalize="none")
    c = data.calibration_images(16, seed=4, normalize="none")
    assert torch.equal(a, b) and not torch.equal(a, c)
    train, _ = data.load_cifar10("train")
    test, _ = data.load_cifar10("test")
    first = (a[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert (train == first).all(axis=(1, 2, 3)).any()
    assert not (test == first).all(axis=(1, 2, 3)).any()
    with pytest.raises(PruneError, match="calibration size"):
        data.calibration_images(0)


def test_text_sets():
    test = data.load_stsb("test")
    assert len(test) == 1379 and all(0 <= s <= 5 for _, _, s in test)
    assert len(data.load_stsb("dev")) == 1500
    valid = data.load_wikitext2("valid")
    assert len(valid.split("\n")) - 1 == 3760
    assert "<unk>" not in data.load_wikitext2("test", raw=True)
    assert len(data.load_tinyshakespeare()) == 1115394
    with pytest.raises(PruneError, match="split"):
        data.load_wikitext2("train")


def test_calibration_text_is_validation_side_and_seeded():
    from transformers import AutoTokenizer

    from prunekit.models.minilm import minilm_dir
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    a = data.calibration_text(tok, n=8, seq_len=32, seed=1, batch_size=4)
    b = data.calibration_text(tok, n=8, seq_len=32, seed=1, batch_size=4)
    assert len(a) == 2 and a[0]["input_ids"].shape == (4, 32)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    text = tok.decode(a[0]["input_ids"][0], skip_special_tokens=True)
    assert text.split()[0].lower() in data.load_wikitext2("valid").lower()


def test_digits_split_is_fixed():
    x, y = data.load_digits("train")
    xt, yt = data.load_digits("test")
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert float(x.max()) <= 1.0
    assert torch.equal(y, data.load_digits("train")[1])
