"""Epoch speed: one training step (forward, backward, optimizer) per weight form.

Two models, one group each, with every form side by side:

- ``resnet20``: ResNet20 on CIFAR-10-sized batches (128 × 3 × 32 × 32 on CUDA,
  4 on CPU), SGD with momentum; low-rank forms through
  ``dynrank.convert_model`` (shortcuts and the classifier stay dense), with
  SVD in every form and Tucker, CP and TKD-CPD in the lowrank form at ρ = 0.5
  (the paper's CIFAR-10 runs).  Each form runs twice: as eager steps, and on
  CUDA also as one replayed CUDA graph per step (``dynrank.train.steps.TrainStep``,
  what ``dynrank-train --cuda-graphs`` does), in a group of its own so its
  ``step / full`` compares graphed steps with graphed steps.
- ``transformer``: a GPT-2-small-shaped LM (12 × 768, 12 heads, 1024 tokens,
  vocab 50257, batch 8 on CUDA; a 2-layer, 64-wide one on CPU), AdamW; its
  linears are ``FusedLowRankLinear`` in the form under test, rank
  ρ × min(in, out); embeddings, LayerNorms and the LM head stay dense, except
  in the ``lowrank-rho0.25+head`` case, whose 768 → 50257 head is lowrank at
  ρ = 0.25 too (the head alone is 29 % of the full forward's multiply-adds,
  causal attention counted at half, and with it dense the ρ = 0.25 step still
  does 0.57× of the full step's multiply-adds).  On
  CUDA the full, ρ = 0.25 and ρ = 0.25 + head steps also run graphed, like
  ResNet20's, with AdamW made capturable.

Forms: ``full``, ``lowrank`` at ρ = 0.25 and 0.5, ``adapter`` at ρ = 0.5 (the
rank a deflate after the ρ = 0.5 phase uses).  CUDA steps run under bf16
autocast with fp32 parameters.  ``extra_info["relative_to_full"]`` is the step
time over the full form's, when the full form ran earlier in the same session
(``report.py`` computes it from the JSON in any case); the paper's "Comp."
column is ``trainable_params`` over the full form's.

The speed target on the GPT-2 step (lowrank ρ = 0.25 over full rank) is stated on the transformer's
``full`` and ``lowrank-rho0.25`` cases, eager and graphed: they are marked ``bench_target`` and their
ids end in ``-target``, so ``-m bench_target`` (or ``-k target``) runs the target's step and its
reference; the ``+head`` case stands beside the target, not in it.
"""

import pytest
import torch
from torch.nn import functional as F

import _bench_common as common
import _bench_models as models
from dynrank.train.loop import _autocast_factory
from dynrank.train.steps import TrainStep

FORMS = [("full", None), ("lowrank", 0.25), ("lowrank", 0.5), ("adapter", 0.5)]
MODELS = ("resnet20", "transformer")
CONV_DECOMPOSITIONS = ("tucker", "cp", "tkd-cpd")   # lowrank at ρ = 0.5, beside SVD's every form
CIFAR_TRAIN_IMAGES = 50_000


def model_config(model_name):
    if model_name == "resnet20":
        return {"batch": 128 if common.ON_CUDA else 4, "image_size": 32, "num_classes": 10}
    if common.ON_CUDA:
        return {"batch": 8, "context": 1024, "vocab": 50257, "dim": 768, "depth": 12, "heads": 12}
    return {"batch": 2, "context": 64, "vocab": 256, "dim": 64, "depth": 2, "heads": 4}


# bf16 autocast on CUDA, off on the CPU: the factory dynrank-train uses (and resnet20_step with amp).
_autocast = _autocast_factory({"amp": common.ON_CUDA}, common.DEVICE)


def make_resnet20_step(form, rank_ratio, cfg, device=common.DEVICE, decomposition="svd", cuda_graphs=False):
    """Setup factory: (step callable, model, source) for ResNet20 in ``form``, eager or graphed,
    channels-last and (on CUDA) under bf16 autocast, as dynrank-train runs it."""
    train_step, model = models.resnet20_step(form, decomposition, rank_ratio, cfg["batch"], cfg["image_size"],
                                             cfg["num_classes"], device, amp=common.ON_CUDA, cuda_graphs=cuda_graphs)

    def step():
        train_step(1e-3)
        common.sync(device)
    return step, model, "dynrank.train.models.resnet20"


def make_transformer_step(form, rank_ratio, cfg, device=common.DEVICE, factorize_head=False, cuda_graphs=False,
                          graphs=None):
    """Setup factory: (step callable, model, source) for the GPT-2-shaped LM in ``form``.

    Eager: forward, cross-entropy, backward and AdamW as plain calls.  ``cuda_graphs``: the same step
    as ``dynrank.train.steps.TrainStep`` replays it (one captured graph, AdamW with
    ``capturable=True``; the step also counts correct predictions, as dynrank-train's does), so the
    host's launch time drops out and what is left is the GPU's.  ``graphs``: TrainStep's capture
    backend (a stand-in lets a CPU test take the graphed path).
    """
    device = torch.device(device)
    make_linear = models.linear_factory(form, rank_ratio)
    model = models.TransformerLM(make_linear, vocab=cfg["vocab"], context=cfg["context"], dim=cfg["dim"],
                                 depth=cfg["depth"], heads=cfg["heads"],
                                 make_head=make_linear if factorize_head else torch.nn.Linear).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, capturable=cuda_graphs and device.type == "cuda")
    tokens = torch.randint(cfg["vocab"], (cfg["batch"], cfg["context"]), device=device)
    targets = torch.randint(cfg["vocab"], (cfg["batch"], cfg["context"]), device=device)
    source = "benchmarks._bench_models.TransformerLM"
    if cuda_graphs:
        train_step = TrainStep(model, optimizer, model, _autocast, 0.0, cuda_graphs=True, graphs=graphs)

        def graphed_step():
            train_step(tokens, targets, 1e-4)
            common.sync(device)
        return graphed_step, model, source

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast():
            logits = model(tokens)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        optimizer.step()
        common.sync(device)
    return step, model, source


def _provider(form, rank_ratio, decomposition="svd", head=False):
    """The case's provider name: form, ρ, a decomposition other than SVD, ``+head``."""
    return ((form if rank_ratio is None else f"{form}-rho{rank_ratio}")
            + ("" if decomposition == "svd" else f"-{decomposition}") + ("+head" if head else ""))


def _is_target(model_name, form, rank_ratio, decomposition, head):
    """Whether the case is one the GPT-2 step target is stated on: the transformer's full step or its
    lowrank ρ = 0.25 step (linears only; the ``+head`` case is not the target's)."""
    return (model_name == "transformer" and decomposition == "svd" and not head
            and (form, rank_ratio) in (("full", None), ("lowrank", 0.25)))


def _case(model_name, form, rank_ratio, decomposition="svd", graphed=False, head=False):
    name = f"{model_name}-{_provider(form, rank_ratio, decomposition, head)}"
    target = _is_target(model_name, form, rank_ratio, decomposition, head)
    marks = (pytest.mark.bench_target,) if target else ()
    name += "-target" if target else ""
    if not graphed:
        return pytest.param(model_name, form, rank_ratio, decomposition, False, head, id=name, marks=marks)
    if not common.ON_CUDA:
        marks += (pytest.mark.skip(reason="CUDA graphs need a CUDA device"),)
    return pytest.param(model_name, form, rank_ratio, decomposition, True, head, id=name + "-cuda_graphs",
                        marks=marks)


# Both models also as graphed steps (dynrank-train --cuda-graphs serves its SGD runs; the transformer's
# graphed twins say how much of its eager step is the host's).
CASES = ([_case(m, f, r) for m in MODELS for f, r in FORMS]
         + [_case("resnet20", "lowrank", 0.5, d) for d in CONV_DECOMPOSITIONS]
         + [_case("transformer", "lowrank", 0.25, head=True)]
         + [_case("resnet20", f, r, graphed=True) for f, r in FORMS]
         + [_case("resnet20", "lowrank", 0.5, d, graphed=True) for d in CONV_DECOMPOSITIONS]
         + [_case("transformer", f, r, graphed=True) for f, r in (("full", None), ("lowrank", 0.25))]
         + [_case("transformer", "lowrank", 0.25, graphed=True, head=True)])


@pytest.mark.parametrize("model_name,form,rank_ratio,decomposition,graphed,head", CASES)
def test_training_step(benchmark, model_name, form, rank_ratio, decomposition, graphed, head):
    cfg = model_config(model_name)
    if model_name == "resnet20":
        step, model, source = make_resnet20_step(form, rank_ratio, cfg, decomposition=decomposition,
                                                 cuda_graphs=graphed)
    else:
        step, model, source = make_transformer_step(form, rank_ratio, cfg, factorize_head=head, cuda_graphs=graphed)
        assert (getattr(model.head, "form", "dense") == form) == head, "the LM head is factorized only in +head"
    dtype = torch.bfloat16 if common.ON_CUDA else torch.float32
    group = (f"epoch {model_name} " + "-".join(f"{k}{v}" for k, v in cfg.items())
             + (" cuda-graphs" if graphed else ""))     # report.py's GRAPHED_GROUP_SUFFIX
    provider = _provider(form, rank_ratio, decomposition, head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    common.describe(
        benchmark, suite="epoch", provider=provider, form=form, pass_="step", dtype=dtype,
        group=group, shape=cfg, rank=None, target=_is_target(model_name, form, rank_ratio, decomposition, head),
        rank_ratio=rank_ratio, model=model_name, model_source=source,
        trainable_params=trainable, total_params=sum(p.numel() for p in model.parameters()),
        autocast="bf16" if common.ON_CUDA else None, decomposition=decomposition if form != "full" else None,
        cuda_graphs=graphed, factorized_head=head,
    )
    common.warm_up(benchmark, step)
    benchmark(step)
    # A replayed graph dispatches no ops to count: a graphed step reuses its eager twin's count.
    flops_key = ("flops", model_name, provider)
    if graphed:
        flops = common.RESULTS.get(flops_key)
    else:
        flops = common.RESULTS[flops_key] = common.flops_of(step) if benchmark.enabled else None
    mean = common.finish(benchmark, flops=flops, dtype=dtype)
    if mean is None:
        return
    info = benchmark.extra_info
    info["samples_per_s"] = cfg["batch"] / mean
    if model_name == "resnet20":
        info["epoch_seconds_estimate"] = mean * -(-CIFAR_TRAIN_IMAGES // cfg["batch"])
    full = common.RESULTS.get(group)
    if form == "full":
        common.RESULTS[group] = (mean, trainable)
    elif full is not None:
        info["relative_to_full"] = mean / full[0]
        info["trainable_share"] = trainable / full[1]


class _CallThroughGraphs:
    """TrainStep's capture backend for a CPU: warm-up and capture run the step as a plain call."""

    def warmup(self, fn):
        return fn()

    def capture(self, fn, optimizer):
        return fn


@pytest.mark.parametrize("form,rank_ratio", [("full", None), ("lowrank", 0.25)])
def test_graphed_transformer_step_takes_the_eager_step(form, rank_ratio):
    """The graphed transformer case steps as the eager one: same model, loss and AdamW, so after the
    warm-up, capture and replays the weights agree (float32 on the CPU, the capture a plain call)."""
    cfg = {"batch": 2, "context": 8, "vocab": 32, "dim": 16, "depth": 1, "heads": 2}
    weights = []
    for graphed in (False, True):
        torch.manual_seed(0)
        step, model, _ = make_transformer_step(form, rank_ratio, cfg, device="cpu", cuda_graphs=graphed,
                                               graphs=_CallThroughGraphs())
        trained = [p for p in model.parameters() if p.requires_grad]
        initial = [p.detach().clone() for p in trained]
        for _ in range(4):      # two warm-ups, the capture, one replay
            step()
        assert trained and all(not torch.equal(p, q) for p, q in zip(trained, initial))   # every one trains
        weights.append([p.detach().clone() for p in model.parameters()])
    assert len(weights[0]) == len(weights[1])
    for eager, graphed in zip(*weights):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
