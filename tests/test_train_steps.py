"""The graphed training step: the same training as eager steps, captured again when a graph goes stale.

A real CUDA graph needs a GPU; here a stand-in backend plays its part.  It holds
the step as a Python call (capture runs nothing; replay runs the step) and it
checks, at every replay, what a real graph bakes in at capture time: the
learning rates and the storage of the parameters.  At capture it checks that
the optimizer already holds its state, which a real graph could not create.
So a graphed run that forgot to copy a batch in, to capture again after a form
change or an LR decay, or to warm up first, fails here against the eager run.
"""

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from dynrank.convert import convert_model
from dynrank.train import cli, steps
from dynrank.train.augment import VisionData
from dynrank.train.loop import evaluate, run_training
from dynrank.train.models import EXCLUDE, GPT, resnet20


class StandInGraphs:
    """Capture keeps the step as a call; replay refuses a graph whose baked-in LR or storage changed."""

    def __init__(self, device="cpu", fail=False):
        self.fail = fail
        self.warmups = 0

    def warmup(self, fn):
        self.warmups += 1
        return fn()

    def capture(self, fn, optimizer):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        missing = [i for i, p in enumerate(params) if not optimizer.state.get(p)]
        if missing:
            raise AssertionError(f"captured before the optimizer had state for parameters {missing}")
        baked = _baked(optimizer)

        def replay():
            if _baked(optimizer) != baked:
                raise AssertionError("replayed a graph captured for another LR or other parameters")
            fn()
        return replay


def _baked(optimizer):
    return ([group["lr"] for group in optimizer.param_groups],
            [p.data_ptr() for group in optimizer.param_groups for p in group["params"]])


def _model(decomposition="tucker"):
    torch.manual_seed(0)
    model = resnet20(num_classes=4, width=0.25)
    convert_model(model, rank_ratio=0.5, decomposition=decomposition, form="lowrank", exclude=EXCLUDE["resnet20"])
    return model


def _batches(count, size=4, short=2):
    gen = torch.Generator().manual_seed(1)
    out = [(torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, 4, (size,), generator=gen))
           for _ in range(count)]
    out.append((torch.randn(short, 3, 8, 8, generator=gen), torch.randint(0, 4, (short,), generator=gen)))
    return out


def _train(cuda_graphs, graphs=None, warmup=2, log=print):
    """Twelve full batches, an LR decay after the fifth, an inflate after the eighth, then a short batch."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    autocast = lambda cache=True: torch.autocast("cpu", enabled=False, cache_enabled=cache)
    step = steps.TrainStep(model, optimizer, model, autocast, 0.1, cuda_graphs=cuda_graphs, warmup=warmup,
                           graphs=graphs, log=log)
    losses = []
    for i, (x, y) in enumerate(_batches(12)):
        if i == 8:
            old = list(model.parameters())
            for m in model.modules():
                if hasattr(m, "inflate") and getattr(m, "form", None) == "lowrank":
                    m.inflate()
            # What the scheduler does: the optimizer now trains the new parameters.
            optimizer.param_groups[0]["params"] = [p for p in model.parameters()]
            assert [p.data_ptr() for p in model.parameters()] != [p.data_ptr() for p in old]
        loss, correct, count = step(x, y, 0.1 if i < 5 else 0.01)
        losses.append((loss.item(), int(correct), count))
    return model, step, losses


def test_graphed_steps_train_exactly_as_eager_steps():
    eager_model, eager, eager_losses = _train(False)
    graphs = StandInGraphs()
    model, graphed, losses = _train(True, graphs)
    assert losses == eager_losses
    for (name, a), (_, b) in zip(model.state_dict().items(), eager_model.state_dict().items()):
        assert torch.equal(a, b), name
    # Captures: the first LR (after 2 warm-ups), the decayed LR, the inflated parameters.
    # Warm-ups: 2 per capture; replays: the other full batches; the short batch ran eagerly.
    assert (graphed.captures, graphs.warmups, graphed.replays) == (3, 6, 6)
    assert (eager.captures, eager.replays) == (0, 0)


def _graphed_svd_step():
    """A graphed TrainStep (stand-in captures, one warm-up) of the SVD model under SGD."""
    model = _model("svd")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    autocast = lambda cache=True: torch.autocast("cpu", enabled=False, cache_enabled=cache)
    return steps.TrainStep(model, optimizer, model, autocast, 0.0, cuda_graphs=True, warmup=1,
                           graphs=StandInGraphs())


def test_a_short_batch_runs_eagerly_and_keeps_the_graph():
    step = _graphed_svd_step()
    batches = _batches(3, short=3)
    for x, y in batches[:2]:
        step(x, y, 0.1)
    assert (step.captures, step.replays) == (1, 1)
    _, _, count = step(*batches[3], 0.1)
    step(*batches[2], 0.1)
    assert count == 3 and (step.captures, step.replays) == (1, 2)


def test_a_failed_capture_falls_back_to_eager_with_a_note():
    notes = []
    eager_model, _, eager_losses = _train(False)
    model, step, losses = _train(True, StandInGraphs(fail=True), log=notes.append)
    assert losses == eager_losses and not step.enabled and step.captures == 0
    assert len(notes) == 1 and "CUDA graph capture failed" in notes[0] and "not permitted" in notes[0]
    assert "more detail" not in notes[0]
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)


def test_bad_settings_raise_clear_errors():
    model = _model("svd")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^warmup must be an int ≥ 1 \(the optimizer state must exist before a "
                                         r"capture\), got 0$"):
        steps.TrainStep(model, optimizer, model, None, 0.0, cuda_graphs=True, warmup=0, graphs=StandInGraphs())
    with pytest.raises(TypeError, match=r"^warmup must be an int ≥ 1 .*, got str \('2'\)$"):
        steps.TrainStep(model, optimizer, model, None, 0.0, cuda_graphs=True, warmup="2", graphs=StandInGraphs())
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device, got cpu"):
        steps.TrainStep(model, optimizer, model, None, 0.0, cuda_graphs=True)


@pytest.mark.parametrize("argv,message", [
    (["--data", "cifar10", "--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs a CUDA device, got --device cpu"),
])
def test_cli_refuses_cuda_graphs_where_they_cannot_run(argv, message):
    cfg = cli.config_from_args(cli.build_parser().parse_args(argv))
    with pytest.raises(ValueError, match=message):
        cli._resolve_device(cfg)


def test_cli_refuses_cuda_graphs_with_compile_or_adamw(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    parse = lambda argv: cli.config_from_args(cli.build_parser().parse_args(argv + ["--device", "cuda"]))
    with pytest.raises(ValueError, match="--cuda-graphs and --compile are alternatives"):
        cli._resolve_device(parse(["--data", "cifar10", "--cuda-graphs", "--compile"]))
    with pytest.raises(ValueError, match="captures the SGD step; got --optimizer adamw"):
        cli._resolve_device(parse(["--cuda-graphs"]))
    assert cli._resolve_device(parse(["--data", "cifar10", "--cuda-graphs"]))["cuda_graphs"] is True


def test_a_dynamic_run_with_graphs_matches_the_eager_run(tmp_path, monkeypatch):
    """run_training end to end: form changes at I and D and an LR decay each capture a new graph."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (36, 3, 8, 8), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 4, (36,), generator=gen)
    cfg = cli.config_from_args(cli.build_parser().parse_args(
        ["--data", "cifar10", "--device", "cpu", "--width", "0.5", "--epochs", "4", "--milestones", "3",
         "--inflate-epoch", "1", "--deflate-epoch", "2", "--batch-size", "8", "--decomposition", "cp"]))
    cfg = cli._resolve_device(cfg)
    # As on CUDA: channels-last batches, and convs laid out again in place after each form change.
    cfg["channels_last"] = True
    results, graphs_made = {}, []

    def stand_in(device):
        graphs_made.append(StandInGraphs(device))
        return graphs_made[-1]
    for graphed in (False, True):
        data = VisionData(x, y, x[:8], y[:8], (0.5,) * 3, (0.25,) * 3, batch_size=8, seed=0, num_classes=4,
                          channels_last=True)
        cfg["cuda_graphs"] = graphed
        monkeypatch.setattr(steps, "CudaGraphs", stand_in)
        results[graphed] = run_training(cfg, "dynamic", data, str(tmp_path / str(graphed)), log=lambda *a: None)
    strip = lambda history: [{k: v for k, v in r.items() if not k.endswith("_time") and k != "graphed_steps"}
                             for r in history]
    assert strip(results[True]["history"]) == strip(results[False]["history"])
    # Four batches an epoch: two warm-ups for the epoch's new graph, then two replays.
    assert [r["graphed_steps"] for r in results[True]["history"]] == [2, 2, 2, 2]
    assert [r["graphed_steps"] for r in results[False]["history"]] == [0, 0, 0, 0]
    assert [r["form"] for r in results[True]["history"]] == ["lowrank", "full", "adapter", "adapter"]
    assert len(graphs_made) == 1 and graphs_made[0].warmups == 2 * 4  # lowrank, full, adapter, decayed LR
    a = torch.load(tmp_path / "True" / "model.pt")
    b = torch.load(tmp_path / "False" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a CUDA device")
@pytest.mark.parametrize("decomposition,amp", [("tucker", False), ("tucker", True), ("svd", True), ("cp", True),
                                               ("tkd-cpd", True)])
def test_real_cuda_graphs_match_eager_steps_on_cuda(decomposition, amp, monkeypatch):
    """On a GPU: captured and replayed steps train as eager ones do, through an LR decay and an inflate."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    runs = []
    for graphed in (False, True):
        model = _model(decomposition).cuda().to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        autocast = lambda cache=True: torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=cache)
        step = steps.TrainStep(model, optimizer, model, autocast, 0.1, cuda_graphs=graphed)
        losses = []
        for i, (x, y) in enumerate(_batches(12, size=16, short=5)):
            if i == 8:
                for m in model.modules():
                    if getattr(m, "form", None) == "lowrank":
                        m.inflate()
                optimizer.param_groups[0]["params"] = list(model.parameters())
            x = x.cuda().contiguous(memory_format=torch.channels_last)
            loss, _, _ = step(x, y.cuda(), 0.1 if i < 5 else 0.01)
            losses.append(loss.item())
        torch.cuda.synchronize()
        runs.append((model, step, losses))
    (eager_model, _, eager_losses), (model, step, losses) = runs
    assert step.enabled and (step.captures, step.replays) == (3, 6)
    tol = dict(rtol=2e-2, atol=2e-3) if amp else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), **tol)
    for a, b in zip(model.state_dict().values(), eager_model.state_dict().values()):
        torch.testing.assert_close(a, b, **tol)


def test_a_run_that_starts_at_a_short_batch_graphs_the_full_ones():
    """A resume at an epoch's short last batch fixed the graphed layout to it: every full batch after it
    ran eagerly, for the rest of the run, and the epochs were timed as eager ones."""
    step = _graphed_svd_step()
    batches = _batches(4, short=3)
    step(*batches[4], 0.1)                      # the short batch first
    for x, y in batches[:4]:
        step(x, y, 0.1)
    assert (step.captures, step.replays) == (1, 3)      # a warm-up, then the capture's and two more replays
    _, _, count = step(*batches[4], 0.1)                # a short batch again: eager, the graph kept
    step(*batches[0], 0.1)
    assert count == 3 and (step.captures, step.replays) == (1, 4)


def _float64_gpt_and_batch():
    torch.manual_seed(0)
    model = GPT(context=16, dim=32, depth=1, heads=2).double()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (4, 17), generator=gen)
    return model, tokens[:, :-1], tokens[:, 1:]


def test_a_float64_step_is_a_float64_step():
    """The loss cast logits with .float(): a float64 model trained with float32 loss and gradients
    (relative gradient error 8e-8 where float64 round-off is 1e-15)."""
    model, inputs, targets = _float64_gpt_and_batch()
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    autocast = lambda cache=True: torch.autocast("cpu", enabled=False, cache_enabled=cache)
    loss, correct, count = steps.TrainStep(model, optimizer, model, autocast, 0.1)(inputs, targets, 0.1)

    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    logits = reference(inputs)
    ref_loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), label_smoothing=0.1)
    ref_loss.backward()
    ref_optimizer.step()

    assert loss.dtype == torch.float64 and count == targets.numel()
    assert int(correct) == int((logits.argmax(-1) == targets).sum())
    assert abs(loss.item() - ref_loss.item()) <= 1e-13 * ref_loss.item()
    for (name, p), q, b in zip(model.named_parameters(), reference.parameters(), before):
        update, ref_update = p.detach() - b, q.detach() - b
        assert ref_update.norm() > 0, name
        assert (update - ref_update).norm() <= 1e-12 * ref_update.norm(), name


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_each_step_computes_its_own_gradients(graphed):
    """Three steps train as three hand-written float64 SGD steps (momentum, weight decay), each on the
    gradient of its own batch alone: nothing of the step before, nor of the gradients a backward outside
    the steps left on the parameters, is added in."""
    lr, momentum, decay = 0.1, 0.9, 1e-4
    model, _, _ = _float64_gpt_and_batch()
    functional_model = copy.deepcopy(model)         # the reference's forward, called with its own parameters
    reference = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():                     # as a backward outside the steps leaves them
        p.grad = torch.ones_like(p)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=decay)
    autocast = lambda cache=True: torch.autocast("cpu", enabled=False, cache_enabled=cache)
    step = steps.TrainStep(model, optimizer, model, autocast, 0.1, cuda_graphs=graphed, warmup=1,
                           graphs=StandInGraphs() if graphed else None)
    names = [name for name, _ in model.named_parameters()]
    buffers = [None] * len(reference)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        tokens = torch.randint(0, 256, (4, 17), generator=gen)
        before = reference
        # By hand: the loss at the reference parameters, its gradient, then SGD's update.
        params = [p.requires_grad_() for p in (q.clone() for q in reference)]
        logits = torch.func.functional_call(functional_model, dict(zip(names, params)), (tokens[:, :-1],))
        ref_loss = F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1), label_smoothing=0.1)
        grads = torch.autograd.grad(ref_loss, params)
        reference = []
        for i, (p, g) in enumerate(zip(before, grads)):
            g = g + decay * p
            buffers[i] = g if buffers[i] is None else momentum * buffers[i] + g
            reference.append(p - lr * buffers[i])
        loss, _, _ = step(tokens[:, :-1], tokens[:, 1:], lr)
        assert abs(loss.item() - ref_loss.item()) <= 1e-13 * ref_loss.item()
        for name, p, q, b in zip(names, model.parameters(), reference, before):
            update, ref_update = p.detach() - b, q - b
            assert ref_update.norm() > 0, name
            assert (update - ref_update).norm() <= 1e-12 * ref_update.norm(), name
    assert (step.captures, step.replays) == ((1, 2) if graphed else (0, 0))    # one warm-up, then replays


def test_a_graphed_float64_step_returns_the_float64_loss_of_the_eager_step():
    """The graph's loss buffer was float32: a replayed step of a float64 model reported its loss rounded
    to float32 (5.568983173779283 as 5.56898307800293), where the eager step keeps float64."""
    runs = []
    for graphed in (False, True):
        model, _, _ = _float64_gpt_and_batch()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        autocast = lambda cache=True: torch.autocast("cpu", enabled=False, cache_enabled=cache)
        step = steps.TrainStep(model, optimizer, model, autocast, 0.0, cuda_graphs=graphed, warmup=1,
                               graphs=StandInGraphs() if graphed else None)
        gen = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(3):
            tokens = torch.randint(0, 256, (4, 17), generator=gen)
            loss, _, _ = step(tokens[:, :-1], tokens[:, 1:], 0.1)
            losses.append(loss.clone())
        runs.append((step, losses))
    (_, eager), (graphed_step, graphed) = runs
    assert (graphed_step.captures, graphed_step.replays) == (1, 2)     # one warm-up, then two replays
    assert [loss.dtype for loss in eager + graphed] == [torch.float64] * 6
    assert [loss.item() for loss in graphed] == [loss.item() for loss in eager]


def test_evaluate_keeps_float64_and_lifts_16_bit_logits():
    model, inputs, targets = _float64_gpt_and_batch()
    data = SimpleNamespace(device=torch.device("cpu"), val_batches=lambda: [(inputs[:3], targets[:3]),
                                                                             (inputs[3:], targets[3:])])
    loss, accuracy = evaluate(model, data, contextlib.nullcontext)
    with torch.no_grad():
        logits = model(inputs).reshape(-1, 256)
    ref_loss = F.cross_entropy(logits, targets.reshape(-1)).item()
    assert abs(loss - ref_loss) <= 1e-13 * ref_loss
    assert accuracy == (logits.argmax(-1) == targets.reshape(-1)).double().mean().item()
    # What the upcast is for: bf16 (autocast) logits give a float32 loss, as before.
    half, _, _ = steps.loss_and_correct(logits.bfloat16(), targets, 0.0)
    assert half.dtype == torch.float32


def test_evaluate_refuses_a_split_with_nothing_to_evaluate():
    """No evaluated target came out as val loss 0.0 and accuracy 0.0."""
    model, _, _ = _float64_gpt_and_batch()
    data = SimpleNamespace(device=torch.device("cpu"), val_batches=lambda: [])
    with pytest.raises(ValueError, match=r"^data\.val_batches\(\) must yield at least one target to evaluate, "
                                         r"got none from SimpleNamespace$"):
        evaluate(model, data, contextlib.nullcontext)
