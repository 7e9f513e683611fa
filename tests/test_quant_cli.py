"""`prunekit quantize` and the listing of quantizers in `prunekit methods`."""

import json

from prunekit.cli import main
from prunekit.io import read_weights


def test_quantize_cli_writes_a_loadable_directory(tmp_path, capsys):
    from prunekit.models import create
    from prunekit.quant import load_quantized

    out = tmp_path / "q"
    assert main(["quantize", "digits-cnn", "--pretrained", "--method", "gptq", "--bits", "4",
                 "-o", "act_order=true", "--calib-samples", "64", "--out", str(out), "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "gptq" and report["bits"] == 4 and report["grid"] == "int4"
    assert report["options"]["act_order"] is True
    assert [lr["name"] for lr in report["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    forms = load_quantized(create("digits-cnn"), out)
    assert set(forms) == {"conv1", "conv2", "fc1", "fc2"}
    assert "fc1.codes" not in read_weights(out / "model.safetensors")  # plain weights file
    assert main(["eval", "digits-cnn", "--weights", str(out / "model.safetensors"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 90


def test_quantize_cli_errors_write_nothing(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "digits-cnn", "--bits", "9", "--out", str(out)]) == 2
    assert "bits must be in 2..8" in capsys.readouterr().err
    assert main(["quantize", "digits-cnn", "--group-size", "128", "--method", "rtn",
                 "--out", str(out), "--quiet"]) == 2
    assert "conv1: groups of 128 inputs need the input size to be a multiple of 128" \
        in capsys.readouterr().err
    assert main(["quantize", "digits-cnn", "--method", "sparsegpt"]) == 2
    assert "not a quantization method" in capsys.readouterr().err
    assert main(["quantize", "digits-cnn", "--method", "gptq", "-o", "bogus=1"]) == 2
    assert "unknown option 'bogus'" in capsys.readouterr().err
    assert not out.exists()


def test_methods_lists_the_quantizers(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {m["method"]: m for m in json.loads(capsys.readouterr().out)}
    for name in ("rtn", "gptq", "obq"):
        assert rows[name]["family"] == "quantize"
    assert rows["gptq"]["needs"] == "hessian" and rows["rtn"]["needs"] == "none"
    assert rows["gptq"]["options"]["act_order"] is False
    assert rows["sparsegpt"]["options"]["quant"] is None


def test_quantize_cli_on_a_causal_lm_keeps_the_head_float(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["quantize", "tiny-llama", "--bits", "4", "--group-size", "32",
                 "--calib-samples", "8", "--out", str(out), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [lr["name"] for lr in report["layers"]]
    assert "lm_head" not in names and len(names) == 14
    assert report["options"]["sequential"] is True


def test_quantize_cli_formats(tmp_path, capsys):
    """--format prunekit writes one packed file that rebuilds the same codes and weights;
    --format gguf-q4_0 writes a llama.cpp file whose blocks dequantize to the model's
    weights; a format the model cannot take is refused before any work, writing nothing."""
    import torch

    from prunekit.models import create
    from prunekit.quant import quantize
    from prunekit.quant.formats import load_packed, read_gguf
    from prunekit.quant.methods.rtn import RTN

    packed = tmp_path / "digits.safetensors"
    assert main(["quantize", "digits-cnn", "--pretrained", "--method", "rtn", "--bits", "3",
                 "--format", "prunekit", "--out", str(packed)]) == 2
    assert "conv1: --format prunekit holds linear layers only" in capsys.readouterr().err
    assert not packed.exists()
    assert main(["quantize", "digits-cnn", "--pretrained", "--method", "rtn", "--bits", "3",
                 "-o", "exclude=conv*", "--format", "prunekit", "--out", str(packed), "--json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["export"]["format"] == "prunekit"
    want = create("digits-cnn", pretrained=True)
    quantize(want, RTN(bits=3, exclude=("conv*",)), None, progress=False)
    got = create("digits-cnn")
    forms = load_packed(got, packed)
    assert set(forms) == {"fc1", "fc2"}
    for name, w in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], w), name

    gguf = tmp_path / "tiny.gguf"
    assert main(["quantize", "tiny-llama", "--method", "rtn", "--bits", "4", "--group-size",
                 "32", "-o", "scale_dtype=float16", "--format", "gguf-q4_0", "--out",
                 str(gguf), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["export"]["exact"]
    assert any(name.endswith("attn_q.weight") for name in read_gguf(gguf))

    bad = tmp_path / "no.gguf"
    assert main(["quantize", "digits-cnn", "--method", "rtn", "--format", "gguf-q4_0",
                 "--out", str(bad)]) == 2
    assert "not one" in capsys.readouterr().err and not bad.exists()
