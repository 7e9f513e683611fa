import pytest
import torch
from safetensors.torch import save_file

from prunekit import PruneError, models
from prunekit.io import load_weights, read_weights


def test_registry_lists_and_rejects_unknown():
    infos = {m.name: m for m in models.list_models()}
    for n in ("resnet20-cifar10", "resnet32-cifar10", "resnet44-cifar10", "resnet56-cifar10",
              "minilm", "digits-cnn", "tiny-bert", "tiny-gpt2", "tiny-llama"):
        assert n in infos and models.get_info(n) == infos[n]
    assert infos["minilm"].task == "sentence-embedding" and infos["minilm"].dataset == "stsb"
    assert infos["tiny-gpt2"].task == "causal-lm" and not infos["tiny-gpt2"].pretrained_available
    with pytest.raises(PruneError, match="unknown model 'resnet99'"):
        models.create("resnet99")
    with pytest.raises(PruneError, match="torchvision has no classification model 'nonet'"):
        models.create("tv:nonet")
    with pytest.raises(PruneError, match="no pretrained weights"):
        models.create("tiny-bert", pretrained=True)


@pytest.mark.parametrize("depth,params", [(20, 269722), (56, 853018)])
def test_resnet_loads_shared_weights_exactly(depth, params):
    from prunekit.data import path_of
    m = models.create(f"resnet{depth}-cifar10", pretrained=True)
    state = read_weights(path_of(f"cifar10_resnets/resnet{depth}.safetensors"))
    own = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")
           and ".shortcut." not in k}  # the shortcuts' zero channels are not in the file
    assert own.keys() == state.keys()  # module names equal the file's keys
    assert all(torch.equal(own[k], v) for k, v in state.items())
    assert sum(p.numel() for p in m.parameters()) == params
    assert not m.training


def test_option_a_shortcut_pads_both_sides_of_the_subsampled_input():
    m = models.create("resnet20-cifar10")
    block = m.layer2[0]
    x = torch.randn(2, 16, 32, 32)
    y = block.shortcut(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    assert isinstance(m.layer1[0].shortcut, torch.nn.Identity)
    assert m.layer3[0].conv1.stride == (2, 2) and m.layer3[1].conv1.stride == (1, 1)
    assert m(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_weights_mismatch_names_tensor_and_shapes(tmp_path):
    m = models.create("resnet20-cifar10")
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["layer2.0.conv1.weight"] = torch.zeros(32, 8, 3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(PruneError) as e:
        models.load_model("resnet20-cifar10", weights=tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "layer2.0.conv1.weight" in msg and "(32, 8, 3, 3)" in msg and "(32, 16, 3, 3)" in msg
    del state["layer2.0.conv1.weight"]
    save_file(state, tmp_path / "missing.safetensors")
    with pytest.raises(PruneError, match="layer2.0.conv1.weight is missing"):
        load_weights(m, tmp_path / "missing.safetensors")


def test_pickle_checkpoint_refused_unless_allowed(tmp_path):
    m = models.create("digits-cnn")
    torch.nn.init.constant_(m.fc2.weight, 0.25)
    torch.save(m.state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(PruneError, match="allow_pickle"):
        models.load_model("digits-cnn", weights=tmp_path / "ckpt.pt")
    loaded = models.load_model("digits-cnn", weights=tmp_path / "ckpt.pt", allow_pickle=True)
    assert torch.equal(loaded.fc2.weight, m.fc2.weight)


def test_module_function_spec_and_torchvision_with_weights(tmp_path):
    m = models.load_model("torchvision.models:resnet18", num_classes=10)
    assert m.fc.out_features == 10 and not m.training
    torch.nn.init.constant_(m.fc.bias, 0.5)
    from prunekit.io import save_weights
    save_weights(m, tmp_path / "r18.safetensors")
    tv = models.load_model("tv:resnet18", weights=tmp_path / "r18.safetensors", num_classes=10)
    assert torch.equal(tv.fc.bias, torch.full((10,), 0.5))
    with pytest.raises(PruneError, match=r"fc\.bias has shape \(10,\) but the model expects "
                                         r"\(1000,\)"):
        models.load_model("tv:resnet18", weights=tmp_path / "r18.safetensors")
    with pytest.raises(PruneError, match="cannot load model function"):
        models.load_model("no_such_module:fn")
    with pytest.raises(PruneError, match="not a torch.nn.Module"):
        models.load_model("builtins:dict")


def test_digits_cnn_is_deterministic_cached_and_accurate(tmp_path, monkeypatch):
    from prunekit.evaluate import evaluate
    from prunekit.models.digits import train_digits_cnn
    a, b = train_digits_cnn(epochs=2), train_digits_cnn(epochs=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    m = models.create("digits-cnn", pretrained=True)
    cached = tmp_path / "digits-cnn-v1.safetensors"
    assert cached.exists() and [p.name for p in tmp_path.iterdir()] == [cached.name]
    again = models.create("digits-cnn", pretrained=True)  # loaded from the cache
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))
    assert evaluate(m, "digits-cnn")["top1"] > 95


def test_tiny_transformers_behave_like_hf_models():
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    for name in ("tiny-bert", "tiny-gpt2", "tiny-llama"):
        m = models.create(name)
        again = models.create(name)
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))
        out = m(input_ids=ids, labels=ids)
        assert out.logits.shape == (2, 24, 128) and out.loss.ndim == 0
        batches = models.calibration_batches(name, n=5, batch_size=2)
        assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
        assert m(**batches[0]).logits.shape[:2] == batches[0]["input_ids"].shape
    for name in ("tiny-gpt2", "tiny-llama"):  # causal: a later token never changes earlier logits
        m = models.create(name)
        changed = ids.clone()
        changed[:, 12:] = (changed[:, 12:] + 1) % 128
        torch.testing.assert_close(m(input_ids=ids).logits[:, :12],
                                   m(input_ids=changed).logits[:, :12])
    tok = models.create("tiny-gpt2").tokenizer
    enc = tok(["Hello", "é!"], padding=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == [[72, 101, 108, 108, 111], [63, 33, 0, 0, 0]]
    assert enc["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]


def test_calibration_batches_come_from_training_data():
    from prunekit.data import calibration_images, load_digits
    batches = models.calibration_batches("resnet20-cifar10", n=10, seed=2, batch_size=4)
    assert [b.shape for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    assert torch.equal(torch.cat(batches), calibration_images(10, seed=2))
    digits = torch.cat(models.calibration_batches("digits-cnn", n=20, seed=0))
    train, _ = load_digits("train")
    rows = {r.numpy().tobytes() for r in train}
    assert len(digits) == 20 and all(d.numpy().tobytes() in rows for d in digits)
    text = models.calibration_batches("minilm", n=6, batch_size=4, seq_len=16,
                                      source="wikitext2")
    assert text[0]["input_ids"].shape == (4, 16) and text[1]["attention_mask"].shape == (2, 16)
    from prunekit.data import load_stsb
    sents = models.calibration_batches("minilm", n=6, seed=1, batch_size=4)
    again = models.calibration_batches("minilm", n=6, seed=1, batch_size=4)
    assert [len(b["input_ids"]) for b in sents] == [4, 2]
    assert torch.equal(sents[0]["input_ids"], again[0]["input_ids"])
    tok = models.create("minilm").tokenizer
    dev = {s for a, b, _ in load_stsb("dev") for s in (a, b)}
    test = {s for a, b, _ in load_stsb("test") for s in (a, b)}
    dev_ids = {tuple(tok(s, truncation=True, max_length=128)["input_ids"]) for s in dev - test}
    for row, mask in zip(sents[0]["input_ids"], sents[0]["attention_mask"]):
        assert tuple(row[mask.bool()].tolist()) in dev_ids
    with pytest.raises(PruneError, match="source"):
        models.calibration_batches("minilm", n=4, source="c4")
    with pytest.raises(PruneError, match="no calibration data"):
        models.calibration_batches("tv:resnet18")


def test_minilm_embeddings_are_mean_pooled_normalised_and_meaningful():
    from transformers import BertModel

    from prunekit.models.minilm import minilm_dir
    m = models.create("minilm", pretrained=True)
    assert not any("pooler" in n for n, _ in m.named_modules())
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.",
                 "The stock market fell sharply today."]
    e = m.encode(sentences)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
    # reference: the full HF model, mean over the real tokens of the padded batch
    ref = BertModel.from_pretrained(minilm_dir()).eval()
    enc = m.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (h * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(e, pooled / pooled.norm(dim=1, keepdim=True), atol=1e-5, rtol=0)
    assert len(m.tokenizer("hello world")["input_ids"]) == 4  # [CLS] hello world [SEP]


@pytest.mark.slow
@pytest.mark.parametrize("name,published", [("resnet20-cifar10", 91.73),
                                            ("resnet56-cifar10", 93.39)])
def test_pretrained_resnets_reproduce_published_top1(name, published):
    from prunekit.evaluate import evaluate
    m = models.create(name, pretrained=True)
    assert evaluate(m, name)["top1"] == pytest.approx(published, abs=0.3)


@pytest.mark.slow
def test_minilm_reproduces_stsb_spearman():
    from prunekit.evaluate import evaluate
    m = models.create("minilm", pretrained=True)
    assert evaluate(m, "minilm")["stsb_spearman"] == pytest.approx(82.0, abs=0.5)
