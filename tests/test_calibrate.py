import pytest
import torch
from torch import nn

from prunekit import PruneError
from prunekit.layers import find_layers, weight_matrix
from prunekit.oneshot.calibrate import Blockwise, collect_stats, input_rows

CONVS = [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
    nn.Conv2d(4, 8, (3, 2), groups=2, padding=(1, 0)),
    nn.Conv2d(4, 4, 3, groups=4, padding="same"),
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
    nn.Conv1d(4, 6, 5, stride=2, padding=2),
    nn.Conv3d(4, 6, 3, padding=1, stride=(1, 2, 1)),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: repr(c))
def test_unfolded_rows_reproduce_the_conv(conv):
    shape = {1: (2, 4, 11), 2: (2, 4, 9, 10), 3: (2, 4, 5, 6, 7)}[len(conv.kernel_size)]
    x = torch.randn(shape)
    rows = input_rows(conv, x)  # (G, n, d)
    w = weight_matrix(conv).detach()
    g = conv.groups
    outs = [rows[i] @ wg.T for i, wg in enumerate(w.chunk(g))]
    ref = (conv(x) - conv.bias.view(1, -1, *[1] * (x.dim() - 2))).detach()
    ref = ref.movedim(1, -1).reshape(-1, ref.shape[1])
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, rtol=1e-4, atol=1e-4)


def test_hessian_is_sum_of_outer_products():
    lin = nn.Linear(5, 3)
    xs = [torch.randn(4, 7, 5), torch.randn(2, 7, 5)]
    stats = collect_stats(lin, {"l": lin}, xs)["l"]
    allx = torch.cat([x.reshape(-1, 5) for x in xs]).double()
    torch.testing.assert_close(stats.hessian[0], allx.T @ allx, rtol=1e-5, atol=1e-5)
    assert stats.rows == 42
    torch.testing.assert_close(stats.col_sq()[0], (allx**2).sum(0), rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=1.0):
        return x + scale * self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d=16, depth=3):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h, scale=0.5)
        return self.head(h)


def test_sequential_sees_pruned_inputs_and_one_block_at_a_time():
    """Stage k's statistics equal a full forward pass of the model with stages < k pruned."""
    torch.manual_seed(1)
    net = Net()
    batches = [torch.randn(4, 5, 8) for _ in range(3)]
    layers = find_layers(net)
    seq = Blockwise(net, layers, batches)
    stages = []
    for stage, stage_layers, stats in seq.stages():
        reference = collect_stats(net, stage_layers, batches)
        for name in stage_layers:
            torch.testing.assert_close(stats[name].hessian, reference[name].hessian,
                                       rtol=1e-6, atol=1e-6)
        stages.append((stage, sorted(stage_layers)))
        with torch.no_grad():  # "prune" the stage so later stages must see the change
            for m in stage_layers.values():
                m.weight.mul_((torch.rand_like(m.weight) > 0.5).float())
    assert stages == [
        ("before blocks", ["embed"]),
        ("blocks.0", ["blocks.0.fc1", "blocks.0.fc2"]),
        ("blocks.1", ["blocks.1.fc1", "blocks.1.fc2"]),
        ("blocks.2", ["blocks.2.fc1", "blocks.2.fc2"]),
        ("after blocks", ["head"]),
    ]


def test_sequential_refuses_blocks_that_are_not_chained():
    net = Net()
    with pytest.raises(PruneError, match="not chained"):
        list(Blockwise(net, find_layers(net), [torch.randn(2, 8)],
                        blocks=["blocks.0", "blocks.2"]).stages())


def test_chain_check_runs_two_examples_of_the_first_batch():
    net = Net()
    seen = []
    hook = net.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    batches = [torch.randn(6, 5, 8), torch.randn(6, 5, 8)]
    Blockwise(net, find_layers(net), batches)._check_chained()
    hook.remove()
    assert seen == [2]
    with pytest.raises(PruneError, match="blocks.0 and blocks.2 are not chained"):
        Blockwise(net, find_layers(net), batches,
                  blocks=["blocks.0", "blocks.2"])._check_chained()


def test_first_rows_cuts_every_tensor_that_shares_the_batch_dimension():
    from prunekit.batches import first_rows

    ids, mask = torch.arange(12).view(4, 3), torch.ones(4, 3)
    assert torch.equal(first_rows(ids), ids[:2])
    cut = first_rows({"input_ids": ids, "attention_mask": mask, "flag": True})
    assert torch.equal(cut["input_ids"], ids[:2]) and cut["attention_mask"].shape == (2, 3)
    assert cut["flag"] is True
    a, b = first_rows((ids, mask), rows=1)
    assert a.shape == (1, 3) and b.shape == (1, 3)
    odd = (ids, torch.ones(3))  # not one batch dimension: left whole
    assert first_rows(odd) is odd
    small = ids[:2]
    assert first_rows(small) is small


def test_micro_batches_cut_token_batches_only_and_keep_every_row():
    from prunekit.batches import micro_batches

    ids = torch.arange(40).view(10, 4)
    mask = torch.ones(10, 4, dtype=torch.long)
    pieces = micro_batches([{"input_ids": ids, "attention_mask": mask}], tokens=12)
    assert [p["input_ids"].shape[0] for p in pieces] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces]), ids)
    assert torch.equal(torch.cat([p["attention_mask"] for p in pieces]), mask)
    assert len(micro_batches([ids], tokens=2)) == 10  # at least one example a piece
    images = torch.randn(10, 3, 4, 4)
    embeds = torch.randn(10, 4)  # floating point: not token ids
    small = ids[:3]  # 12 tokens: one piece
    kept = micro_batches([images, (embeds,), small], tokens=12)
    assert len(kept) == 3 and kept[0] is images and kept[1][0] is embeds and kept[2] is small


def test_micro_batched_calibration_prunes_as_the_whole_batch_does(monkeypatch):
    """The engine cuts token batches into pieces of MICRO_TOKENS tokens (faster, less
    memory): the statistics are the same sums, so the pruned model is the same."""
    import prunekit
    import prunekit.batches as batches

    torch.manual_seed(0)
    dense = prunekit.models.create("tiny-llama")
    ids = torch.randint(0, dense.config.vocab_size, (6, 16))
    layers = find_layers(dense, exclude=("lm_head",))
    whole = collect_stats(dense, layers, [ids])
    cut = collect_stats(dense, layers, batches.micro_batches([ids], tokens=32))
    for name in layers:
        assert cut[name].rows == whole[name].rows == 6 * 16
        h = whole[name].hessian  # the same sums in another order: float32 rounding apart
        torch.testing.assert_close(cut[name].hessian, h, rtol=0, atol=1e-6 * float(h.abs().max()))
    models = []
    for tokens in (10**9, 32):
        monkeypatch.setattr(batches, "MICRO_TOKENS", tokens)
        model = prunekit.models.create("tiny-llama")
        model.load_state_dict(dense.state_dict())
        prunekit.prune(model, prunekit.SparseGPT(sparsity=0.5, sequential=True,
                                                 exclude=("lm_head",)), [ids], progress=False)
        models.append(model.state_dict())
    assert all(torch.allclose(models[0][k], models[1][k], atol=1e-5) for k in models[0])


def test_no_prunable_layer_and_bad_globs():
    with pytest.raises(PruneError, match="no prunable layer"):
        find_layers(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.raises(PruneError, match="prunable layers are"):
        find_layers(Net(), include=["nothing*"])
    names = list(find_layers(Net(), keep_first=True, keep_last=True))
    assert names[0] == "blocks.0.fc1" and names[-1] == "blocks.2.fc2"


def test_gpt2_conv1d_is_prunable_with_transposed_view():
    from transformers.pytorch_utils import Conv1D
    c = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs, weight (4, 6)
    x = torch.randn(3, 4)
    w = weight_matrix(c)
    assert w.shape == (6, 4)
    torch.testing.assert_close(x @ w.T + c.bias, c(x))
    assert list(find_layers(nn.Sequential(c))) == ["0"]
    rows = input_rows(c, x)
    torch.testing.assert_close(rows[0], x)


def test_padding_tokens_do_not_count():
    """A padded batch gives the same statistics as the real tokens alone, in both modes."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                num_hidden_layers=2, vocab_size=50),
                     add_pooling_layer=False).eval()
    layers = find_layers(bert)
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    padded = [{"input_ids": ids, "attention_mask": mask}]
    alone = [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :5]}]
    a = collect_stats(bert, layers, padded)
    b = collect_stats(bert, layers, alone)
    for name in layers:
        assert a[name].rows == 14
        torch.testing.assert_close(a[name].hessian, b[name].hessian, rtol=1e-4, atol=1e-4)
    seq = {n: st for _, _, stats in Blockwise(bert, layers, padded).stages()
           for n, st in stats.items()}
    for name in layers:
        torch.testing.assert_close(seq[name].hessian, a[name].hessian, rtol=1e-4, atol=1e-4)


def test_diagonal_statistics_are_the_hessians_diagonal():
    """A method that reads only diag(H) (Wanda) gathers d sums of squares per layer instead
    of d x d: the same diagonal as the full statistics, block by block too, and the same
    Wanda model as scoring from the full H."""
    import copy

    import prunekit
    from prunekit.models import create
    from prunekit.oneshot.calibrate import Blockwise, collect_stats
    from prunekit.oneshot.methods.wanda import Wanda

    model = create("tiny-llama")
    layers = prunekit.layers.find_layers(model, exclude=("lm_head",))
    batches = [torch.randint(0, 100, (2, 24)) for _ in range(3)]
    full = collect_stats(model, layers, batches)
    diag = collect_stats(model, layers, batches, diagonal=True)
    for name in layers:
        assert diag[name].diagonal and not full[name].diagonal
        h, d = full[name].hessian, diag[name].hessian
        assert d.shape == h.shape[:2]  # (groups, d): d numbers per group, not d x d
        assert torch.allclose(d, torch.diagonal(h, dim1=1, dim2=2), rtol=1e-5)
        assert torch.allclose(diag[name].col_sq(), full[name].col_sq(), rtol=1e-5)
        for g in range(d.shape[0]):
            m = diag[name].matrix(g)
            assert torch.equal(m, torch.diag(d[g])) and torch.equal(full[name].matrix(g), h[g])
    stages = list(Blockwise(model, layers, batches, diagonal=True).stages())
    assert all(st.diagonal for _, _, stats in stages for st in stats.values())

    class FullWanda(Wanda):  # the same scores from the full X^T X
        statistic = "full"

    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = prunekit.prune(a, Wanda(sparsity=0.5, exclude=("lm_head",)), batches, progress=False)
    prunekit.prune(b, FullWanda(sparsity=0.5, exclude=("lm_head",)), batches, progress=False)
    for name in layers:
        wa, wb = a.get_submodule(name).weight, b.get_submodule(name).weight
        assert torch.equal(wa == 0, wb == 0), name
    assert all(lr.rel_error is None for lr in ra.layers)


def test_layers_reading_one_input_share_its_statistic_and_equal_separate_runs():
    """q, k and v read the same tensor: computed once, equal to collecting each alone; a
    change made in place between two readers is seen (no stale statistic)."""

    class Fan(nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 4), nn.Linear(6, 5), nn.Linear(6, 3)
            self.inplace = inplace

        def forward(self, x):
            x = x * 1.0
            ya = self.a(x)
            if self.inplace:
                x.mul_(3.0)
            return ya.sum() + self.b(x).sum() + self.c(x).sum()

    from prunekit.oneshot.calibrate import StatsCollector

    computed = []
    statistic = StatsCollector._statistic

    def counted(self, name, module, x):
        computed.append(name)
        return statistic(self, name, module, x)

    for inplace in (False, True):
        net = Fan(inplace)
        batches = [torch.randn(5, 7, 6) for _ in range(2)]
        computed.clear()
        StatsCollector._statistic = counted
        try:
            together = collect_stats(net, {"a": net.a, "b": net.b, "c": net.c}, batches)
        finally:
            StatsCollector._statistic = statistic
        # once per batch; twice when the input changed in place after a read it
        assert computed == (["a", "b", "a", "b"] if inplace else ["a", "a"])
        for name in ("a", "b", "c"):
            alone = collect_stats(net, {name: getattr(net, name)}, batches)
            assert torch.equal(together[name].hessian, alone[name].hessian)
            assert together[name].rows == alone[name].rows == 70
        scale = 9.0 if inplace else 1.0
        torch.testing.assert_close(together["b"].hessian, scale * together["a"].hessian,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diagonal"])
def test_nan_reaching_a_layer_inside_the_model_is_named(diagonal):
    """Finite calibration data can still turn NaN inside the model (an overflow, a bad
    weight upstream): the layer whose input holds it is named, in both statistic kinds."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias[2] = float("nan")
    with pytest.raises(PruneError, match=r"^1: its calibration input holds NaN or Inf"):
        collect_stats(model, {"1": model[1]}, [torch.randn(5, 4)], diagonal=diagonal)
