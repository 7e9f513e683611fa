import pytest
import torch
from safetensors.torch import save_file

from prunekit import PruneError, models
from prunekit.evaluate import evaluate, fidelity, reestimate_bn, top1_accuracy
from prunekit.io import load_weights


def test_registry_lists_and_rejects_unknown():
    names = [m.name for m in models.list_models()]
    for n in ("resnet20-cifar10", "resnet56-cifar10", "minilm", "digits-cnn", "tiny-gpt2"):
        assert n in names
    with pytest.raises(PruneError, match="unknown model"):
        models.create("resnet99")
    with pytest.raises(PruneError, match="torchvision has no"):
        models.create("tv:nonet")
    assert isinstance(models.create("tv:resnet18"), torch.nn.Module)


def test_resnet_loads_shared_weights_exactly():
    from prunekit.data import path_of
    from prunekit.io import read_weights
    m = models.create("resnet20-cifar10", pretrained=True)
    state = read_weights(path_of("cifar10_resnets/resnet20.safetensors"))
    own = m.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert sum(p.numel() for p in m.parameters()) == 269722


def test_weights_mismatch_names_tensor_and_shapes(tmp_path):
    m = models.create("resnet20-cifar10")
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["layer2.0.conv1.weight"] = torch.zeros(32, 8, 3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(PruneError) as e:
        load_weights(m, tmp_path / "bad.safetensors")
    assert "layer2.0.conv1.weight" in str(e.value) and "(32, 8, 3, 3)" in str(e.value)
    assert "(32, 16, 3, 3)" in str(e.value)
    del state["layer2.0.conv1.weight"]
    save_file(state, tmp_path / "missing.safetensors")
    with pytest.raises(PruneError, match="layer2.0.conv1.weight is missing"):
        load_weights(m, tmp_path / "missing.safetensors")


def test_pickle_checkpoint_refused_unless_allowed(tmp_path):
    m = models.create("digits-cnn")
    torch.save(m.state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(PruneError, match="allow_pickle"):
        models.load_model("digits-cnn", weights=tmp_path / "ckpt.pt")
    loaded = models.load_model("digits-cnn", weights=tmp_path / "ckpt.pt", allow_pickle=True)
    assert torch.equal(loaded.fc2.weight, m.fc2.weight)


def test_module_function_spec():
    m = models.load_model("torchvision.models:resnet18")
    assert m.fc.out_features == 1000
    with pytest.raises(PruneError, match="cannot load model function"):
        models.load_model("no_such_module:fn")


def test_digits_cnn_is_deterministic_and_accurate(tmp_path, monkeypatch):
    from prunekit.models.digits import train_digits_cnn
    a, b = train_digits_cnn(epochs=3), train_digits_cnn(epochs=3)
    assert torch.equal(a.fc2.weight, b.fc2.weight)
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    m = models.create("digits-cnn", pretrained=True)
    assert (tmp_path / "digits-cnn-v1.safetensors").exists()
    assert evaluate(m, "digits-cnn")["top1"] > 95


def test_tiny_transformers_run_and_calibrate():
    for name in ("tiny-bert", "tiny-gpt2", "tiny-llama"):
        m = models.create(name)
        batches = models.calibration_batches(name, n=4, batch_size=2)
        out = m(**batches[0])
        assert out.logits.shape[:2] == batches[0]["input_ids"].shape


def test_minilm_embeddings_are_normalised_and_meaningful():
    m = models.create("minilm", pretrained=True)
    e = m.encode(["A man is playing a guitar.", "Someone plays the guitar.",
                  "The stock market fell sharply today."])
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3
    assert not any("pooler" in n for n, _ in m.named_modules())


def test_reestimate_bn_recovers_statistics():
    m = models.create("resnet20-cifar10", pretrained=True)
    from prunekit.data import calibration_images, cifar10_tensors
    x, y = cifar10_tensors("test", limit=500)
    for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
        bn.running_mean.add_(1.0)
    broken = top1_accuracy(m, x, y)
    reestimate_bn(m, calibration_images(256, seed=1))
    assert not m.training and all(not b.training for b in m.modules())
    assert top1_accuracy(m, x, y) > broken + 20


def test_fidelity_is_zero_for_identical_models():
    m = models.create("digits-cnn")
    batches = [torch.rand(4, 1, 8, 8)]
    f = fidelity(m, m, batches)
    assert f["rel_output_error"] == 0 and f["embedding_cosine"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name,published", [("resnet20-cifar10", 91.73),
                                            ("resnet56-cifar10", 93.39)])
def test_pretrained_resnets_reproduce_published_top1(name, published):
    m = models.create(name, pretrained=True)
    assert evaluate(m, name)["top1"] == pytest.approx(published, abs=0.3)


@pytest.mark.slow
def test_minilm_reproduces_stsb_spearman():
    m = models.create("minilm", pretrained=True)
    assert evaluate(m, "minilm")["stsb_spearman"] == pytest.approx(82.0, abs=0.5)
