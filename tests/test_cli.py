import json

import pytest
import torch

from prunekit.cli import main
from prunekit.io import read_weights


def test_prune_cli_writes_weights_and_json(tmp_path, capsys):
    out = tmp_path / "pruned.safetensors"
    rc = main(["prune", "digits-cnn", "--pretrained", "--method", "sparsegpt", "--pattern", "2:4",
               "-o", "exclude=conv1", "--calib-samples", "64", "--out", str(out), "--json",
               "--quiet"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "sparsegpt" and report["pattern"] == "2:4"
    assert [lr["name"] for lr in report["layers"]] == ["conv2", "fc1", "fc2"]
    w = read_weights(out)
    kept = (w["fc1.weight"] != 0).reshape(64, -1, 4).sum(-1)
    assert (kept <= 2).all() and (kept == 2).float().mean() > 0.5  # dead inputs are zeroed
    assert torch.count_nonzero(w["conv1.weight"]) == w["conv1.weight"].numel()


def test_cli_errors_write_nothing(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["prune", "digits-cnn", "--method", "obs", "-o", "bogus=1", "--out", str(out)]) == 2
    assert "unknown option 'bogus'" in capsys.readouterr().err
    assert main(["prune", "digits-cnn", "--method", "sparsegpt", "--pattern", "1:3",
                 "--out", str(out), "--quiet"]) == 2
    assert "needs the input size to be a multiple of 3" in capsys.readouterr().err
    assert main(["prune", "digits-cnn", "--method", "nope"]) == 2
    assert "known: magnitude" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_methods_and_models_listing(capsys):
    assert main(["methods", "--json"]) == 0
    names = {m["method"] for m in json.loads(capsys.readouterr().out)}
    assert {"magnitude", "random", "wanda", "sparsegpt", "obs"} <= names
    assert main(["models", "--json"]) == 0
    assert "resnet20-cifar10" in {m["name"] for m in json.loads(capsys.readouterr().out)}


def test_eval_cli_on_pruned_weights(tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    assert main(["prune", "digits-cnn", "--pretrained", "--method", "magnitude", "--sparsity",
                 "0.5", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "magnitude unstructured: 4 layers" in printed
    assert printed.rstrip().endswith(f"wrote {out}")
    assert main(["eval", "digits-cnn", "--weights", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 50 < metrics["top1"] <= 100


def test_demo_without_shared_data_runs_what_it_can(tmp_path, monkeypatch, capsys):
    """No shared data: MiniLM is scored by embedding cosine, ResNet-20 gives way to digits."""
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--json", "--quiet", "--calib", "32"]) == 0
    captured = capsys.readouterr()
    assert "not found" in captured.err and "digits" in captured.err
    tables = {t["title"]: t for t in json.loads(captured.out)["tables"]}
    assert "skipping SmolLM2-135M" in captured.err and not any("SmolLM2" in t for t in tables)
    minilm = tables["MiniLM-L6 sentence encoder"]
    assert minilm["metric"].startswith("embedding cosine")
    assert sorted((r["method"], r["pattern"]) for r in minilm["rows"]) == sorted([
        ("magnitude", "unstructured"), ("wanda", "unstructured:row"),
        ("sparsegpt", "unstructured"), ("magnitude", "2:4"), ("wanda", "2:4"),
        ("sparsegpt", "2:4")])
    for r in minilm["rows"]:
        assert r["sparsity"] == 0.5 and r["before"] == 100.0 and 0 < r["after"] < 100
    digits = {r["method"]: r for r in tables["digits CNN (scikit-learn digits)"]["rows"]}
    assert set(digits) == {"magnitude", "wanda", "sparsegpt", "obs"}
    assert all(abs(r["sparsity"] - 0.7) < 0.01 for r in digits.values())
    # the Hessian-based methods keep more of the dense accuracy than magnitude
    assert digits["sparsegpt"]["after"] >= digits["magnitude"]["after"] - 1
    assert digits["obs"]["after"] >= digits["magnitude"]["after"] - 1


def test_prune_cli_for_a_measured_speedup(tmp_path, monkeypatch, capsys, one_thread):
    """--speedup: the latency table (built in the model) sizes the budget and the loop
    measures the result. Both timings are replaced by deterministic stand-ins that agree (a
    layer at sparsity s takes 1/(1+s) of its dense time; the model's speedup is 1 + the
    pruned layers' mean sparsity), so that the loop's choice can be checked on a loaded
    machine too: no timing is asserted."""
    import prunekit.budget.latency_table as latency_table
    import prunekit.budget.measured as measured
    from prunekit.layers import find_layers

    level = [0.0]
    probe = latency_table._probe_weights

    def probe_at(module, lvl, pattern, gen):
        level[0] = lvl
        return probe(module, lvl, pattern, gen)

    def timed(variants, names, batch, repeats):  # every layer at the last probed level
        out = {}
        for v in variants:
            t = 1e-3 if v == "dense" else 1e-3 / (1 + level[0])
            out[v] = {"total": [t * len(names)] * repeats, **{n: [t] * repeats for n in names}}
        return out

    monkeypatch.setattr(latency_table, "_probe_weights", probe_at)
    monkeypatch.setattr(latency_table, "timed_forwards", timed)
    threads = []

    def fake(dense, pruned, batch, kernels, repeats, info=None):
        threads.append(torch.get_num_threads())
        layers = find_layers(pruned, exclude=("fc2",))
        return 1 + sum(float((m.weight == 0).float().mean()) for m in layers.values()) / len(
            layers)

    monkeypatch.setattr(measured, "converted_speedup", fake)
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fast.safetensors"
    assert main(["prune", "digits-cnn", "--pretrained", "--pattern", "1x16", "--speedup", "1.5",
                 "--budget", "uniform", "--calib-samples", "64", "--speedup-batch", "32",
                 "--timing", "model", "--threads", "2", "--out", str(out), "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert threads and set(threads) == {2}  # measured at --threads, restored after
    assert torch.get_num_threads() == 1
    assert report["measured"] >= 1.5 and report["skipped"] == ["fc2"]  # 10 rows: no 1x16
    # the table was timed inside the model: it holds the per-level passes
    tables = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert report["timing"] == "model" and len(tables) == 1
    assert "levels_done" in json.loads(tables[0].read_text())
    w = read_weights(out)
    for name, s in report["budget"].items():  # to within one 1x16 block of the layer
        weight = w[f"{name}.weight"]
        assert float((weight == 0).float().mean()) == pytest.approx(
            s, abs=16 / weight.numel() + 1e-6)
    assert torch.count_nonzero(w["fc2.weight"]) == w["fc2.weight"].numel()
    assert main(["prune", "digits-cnn", "--speedup", "1.5", "--sparsity", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["prune", "digits-cnn", "--pretrained", "--pattern", "1x16", "--speedup", "9",
                 "--budget", "uniform", "--calib-samples", "64", "--speedup-batch", "32",
                 "--out", str(tmp_path / "no.safetensors"), "--quiet"]) == 2
    assert "not reached" in capsys.readouterr().err
    assert not (tmp_path / "no.safetensors").exists()


def test_prune_cli_spreads_a_sparsity_by_budget(capsys):
    """--budget with --sparsity: global and OWL give each layer its own share of the same
    total; a search budget without --speedup, or OWL with one, is refused before any work."""
    assert main(["prune", "tiny-llama", "--method", "wanda", "--sparsity", "0.5", "--budget",
                 "owl", "--calib-samples", "4", "--calib-tokens", "32", "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    shares = {round(lr["sparsity"], 3) for lr in report["layers"]}
    assert len(shares) > 1 and report["options"]["budget"]
    assert main(["prune", "digits-cnn", "--pretrained", "--sparsity", "0.6", "--budget",
                 "global", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len({round(lr["sparsity"], 2) for lr in report["layers"]}) > 1
    assert main(["prune", "digits-cnn", "--sparsity", "0.5", "--budget", "spdy"]) == 2
    assert "give --speedup" in capsys.readouterr().err
    assert main(["prune", "digits-cnn", "--speedup", "1.5", "--budget", "owl"]) == 2
    assert "does not size a --speedup" in capsys.readouterr().err
