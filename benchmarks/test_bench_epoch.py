"""Epoch speed: one training step (forward, backward, optimizer) per weight form.

Two models, one group each, with every form side by side:

- ``resnet20``: ResNet20 on CIFAR-10-sized batches (128 × 3 × 32 × 32 on CUDA,
  4 on CPU), SGD with momentum; low-rank forms through
  ``dynrank.convert_model(decomposition="svd")`` (shortcuts and the classifier
  stay dense), so they skip until ``dynrank.conv`` provides LowRankConv2d.
- ``transformer``: a GPT-2-small-shaped LM (12 × 768, 12 heads, 1024 tokens,
  vocab 50257, batch 8 on CUDA; a 2-layer, 64-wide one on CPU), AdamW; its
  linears are ``FusedLowRankLinear`` in the form under test, rank
  ρ × min(in, out); embeddings, LayerNorms and the LM head stay dense.

Forms: ``full``, ``lowrank`` at ρ = 0.25 and 0.5, ``adapter`` at ρ = 0.5 (the
rank a deflate after the ρ = 0.5 phase uses).  CUDA steps run under bf16
autocast with fp32 parameters.  ``extra_info["relative_to_full"]`` is the step
time over the full form's, when the full form ran earlier in the same session
(``report.py`` computes it from the JSON in any case); the paper's "Comp."
column is ``trainable_params`` over the full form's.
"""

import pytest
import torch
from torch.nn import functional as F

import _bench_common as common
import _bench_models as models

FORMS = [("full", None), ("lowrank", 0.25), ("lowrank", 0.5), ("adapter", 0.5)]
MODELS = ("resnet20", "transformer")
CIFAR_TRAIN_IMAGES = 50_000


def model_config(model_name):
    if model_name == "resnet20":
        return {"batch": 128 if common.ON_CUDA else 4, "image_size": 32, "num_classes": 10}
    if common.ON_CUDA:
        return {"batch": 8, "context": 1024, "vocab": 50257, "dim": 768, "depth": 12, "heads": 12}
    return {"batch": 2, "context": 64, "vocab": 256, "dim": 64, "depth": 2, "heads": 4}


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=common.ON_CUDA)


def make_resnet20_step(form, rank_ratio, cfg, device=common.DEVICE):
    """Setup factory: (step callable, model, source) for ResNet20 in ``form``."""
    model, source = models.resnet20(cfg["num_classes"])
    if form != "full":
        common.require_module("dynrank.conv", "the low-rank CNN forms need LowRankConv2d", "LowRankConv2d")
        convert_model = common.require_module("dynrank.convert", "the low-rank CNN forms need it", "convert_model")
        convert_model(model, rank_ratio=rank_ratio, decomposition="svd", form=form, init="fresh")
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    size = cfg["image_size"]
    images = torch.randn(cfg["batch"], 3, size, size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(cfg["num_classes"], (cfg["batch"],), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast():
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        common.sync(device)
    return step, model, source


def make_transformer_step(form, rank_ratio, cfg, device=common.DEVICE):
    """Setup factory: (step callable, model, source) for the GPT-2-shaped LM in ``form``."""
    model = models.TransformerLM(models.linear_factory(form, rank_ratio), vocab=cfg["vocab"],
                                 context=cfg["context"], dim=cfg["dim"], depth=cfg["depth"],
                                 heads=cfg["heads"]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(cfg["vocab"], (cfg["batch"], cfg["context"]), device=device)
    targets = torch.randint(cfg["vocab"], (cfg["batch"], cfg["context"]), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast():
            logits = model(tokens)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        optimizer.step()
        common.sync(device)
    return step, model, "benchmarks._bench_models.TransformerLM"


def _form_id(form, rank_ratio):
    return form if rank_ratio is None else f"{form}-rho{rank_ratio}"


CASES = [pytest.param(m, f, r, id=f"{m}-{_form_id(f, r)}") for m in MODELS for f, r in FORMS]


@pytest.mark.parametrize("model_name,form,rank_ratio", CASES)
def test_training_step(benchmark, model_name, form, rank_ratio):
    cfg = model_config(model_name)
    make = make_resnet20_step if model_name == "resnet20" else make_transformer_step
    step, model, source = make(form, rank_ratio, cfg)
    dtype = torch.bfloat16 if common.ON_CUDA else torch.float32
    group = f"epoch {model_name} " + "-".join(f"{k}{v}" for k, v in cfg.items())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    common.describe(
        benchmark, suite="epoch", provider=_form_id(form, rank_ratio), form=form, pass_="step", dtype=dtype,
        group=group, shape=cfg, rank=None, rank_ratio=rank_ratio, model=model_name, model_source=source,
        trainable_params=trainable, total_params=sum(p.numel() for p in model.parameters()),
        autocast="bf16" if common.ON_CUDA else None,
    )
    common.warm_up(benchmark, step)
    benchmark(step)
    flops = common.flops_of(step) if benchmark.enabled else None
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
