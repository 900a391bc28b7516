"""The README's Python blocks run as printed.

Self-contained blocks run in an empty namespace.  Blocks that continue the reader's own program get
the few names they assume (``model``, ``loader``, ...) from a small CNN set up here, and run
verbatim otherwise, the 150-epoch schedules included (one tiny batch per epoch).  Every ```python
block of the README must be one of those listed here, so a new example cannot go untested.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import dynrank
from _helpers import REL_TOL, readme_block, readme_blocks, rel_err
from dynrank._forms import FormLayer
from dynrank.kernels.conv_merge import reference_kernel



QUICKSTART = "FusedLowRankLinear(512, 2048, rank=64)"
CONV = "LowRankConv2d(64, 64, 3"
OWN_MODEL = "schedule_from_lr(150"
DDP = "DistributedDataParallel(net)"
MEASURE = "RankMonitor(model"
PROFILE = "profile_forms(model, step"
CLIP = "clip_grads_with_norm_"          # run on 2 gloo processes by tests/test_distributed.py


def test_every_python_block_is_run_here():
    markers = (QUICKSTART, CONV, OWN_MODEL, DDP, MEASURE, PROFILE, CLIP)
    untested = [code.splitlines()[0] for code in readme_blocks() if not any(m in code for m in markers)]
    assert not untested, f"README blocks with no test (first lines): {untested}"


def _cnn(converted=False):
    """A small CNN: two 3×3 convs and a classifier; ``converted``: through ``convert_model`` at ρ = 0.5."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    if converted:
        dynrank.convert_model(model, rank_ratio=0.5)
    return model


def _batch():
    return torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))


def _forms(model):
    return sorted({m.form for m in model.modules() if isinstance(m, FormLayer)})


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)       # blocks that save runs write them here


def test_quickstart_block():
    ns = {}
    exec(readme_block(QUICKSTART), ns)
    model = ns["model"]
    assert [model[i].form for i in (0, 2)] == ["adapter", "adapter"]
    x = torch.randn(2, 3, 512)
    assert rel_err(model(x), _reference_mlp(model, x)) < REL_TOL[torch.float32]


def _reference_mlp(model, x):
    """The adapter MLP in float64 from its tensors: W_f·x + s·A(Bᵀx) + b per layer."""
    h = x.double()
    for i, layer in enumerate((model[0], model[2])):
        W = layer.weight.double() + layer.scale * layer.A.double() @ layer.B.double().T
        h = h @ W.T + layer.bias.double()
        if i == 0:
            h = nn.functional.gelu(h)
    return h


def test_conv_block():
    ns = {}
    exec(readme_block(CONV), ns)
    conv = ns["conv"]
    assert (conv.form, conv.decomposition) == ("adapter", "cp")
    x = torch.randn(2, 64, 6, 6)
    # W = W_f + the adapter's kernel, merged by the kernels' float64 reference
    factors = {n: f.detach().double() for n, f in conv.factors().items()}
    kernel = conv.weight.detach().double() + reference_kernel("cp", factors, conv.scale)
    expected = nn.functional.conv2d(x.double(), kernel, conv.bias.double(), padding=1)
    assert rel_err(conv(x), expected) < REL_TOL[torch.float32]


def test_own_model_block(capsys):
    x, y = _batch()
    ns = {"model": _cnn()}

    def train_one_epoch():
        loss = nn.functional.cross_entropy(ns["model"](x), y)
        ns["optimizer"].zero_grad()
        loss.backward()
        ns["optimizer"].step()

    ns["train_one_epoch"] = train_one_epoch
    exec(readme_block(OWN_MODEL), ns)
    assert (ns["I"], ns["D"]) == (62, 137)             # the values the block's comment shows
    table = capsys.readouterr().out                    # convert_model's summary, printed by the block
    assert table.count("Conv2d → LowRankConv2d") == 2 and "final classifier" in table
    assert _forms(ns["model"]) == ["adapter"]
    assert ns["scheduler"].optimizer is ns["optimizer"]


def test_ddp_block():
    torch.manual_seed(0)
    net = _cnn(converted=True)
    ns = {"net": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1), "I": 1, "D": 3, "epochs": 4,
          "DistributedDataParallel": nn.parallel.DistributedDataParallel, "DynamicRankScheduler":
          dynrank.DynamicRankScheduler, "dynrank": dynrank, "AveragedModel": AveragedModel,
          "get_ema_multi_avg_fn": get_ema_multi_avg_fn, "train_one_epoch": lambda: None}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        exec(readme_block(DDP), ns)
        model = ns["model"]
        assert isinstance(model, nn.parallel.DistributedDataParallel) and model.module is net
        assert _forms(net) == ["adapter"] and _forms(ns["ema"].module) == ["adapter"]   # the copy switched too
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        assert trained == {id(p) for p in net.parameters() if p.requires_grad}   # the new wrapper sees the adapters
    finally:
        dist.destroy_process_group()


def test_measure_block(tmp_path):
    pytest.importorskip("matplotlib", reason="the block plots (dynrank[plots])")
    torch.manual_seed(0)
    x, y = _batch()
    model = _cnn(converted=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    lowrank = dynrank.RankMonitor(_cnn(converted=True), name="lowrank")
    with lowrank.epoch(0):
        pass
    lowrank.log(loss=1.0, accuracy=0.5)
    lowrank.save("runs/lowrank")
    ns = {"model": model, "optimizer": optimizer, "loader": [(x, y)], "criterion": nn.CrossEntropyLoss(),
          "scheduler": dynrank.DynamicRankScheduler(model, optimizer, 55, 120), "val_loss": 1.0, "val_acc": 0.5}
    exec(readme_block(MEASURE), ns)
    monitor = ns["monitor"]
    assert len(monitor.records) == 150
    assert [s["kind"] for s in monitor.switches] == ["inflate", "deflate"]
    for name in ("dynamic.json", "dynamic.layers.csv", "lambda.png", "curves.png"):
        assert (tmp_path / "runs" / name).is_file(), name


def test_profile_block(capsys):
    x, y = _batch()
    model = _cnn(converted=True)
    ns = {"model": model, "x": x, "y": y, "criterion": nn.CrossEntropyLoss(), "torch": torch, "dynrank": dynrank,
          "cost_report": dynrank.cost.cost_report}
    exec(readme_block(PROFILE), ns)
    profile = ns["profile"]
    assert list(profile.seconds) == ["full", "lowrank", "adapter"] and _forms(model) == ["lowrank"]
    out = capsys.readouterr().out
    assert f"{profile.comp_ratio(150, 55, 120)}\n" in out and "measured (wall-clock per step" in out
