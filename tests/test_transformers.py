"""Hugging Face transformers models: GPT-2's Conv1D is converted as a linear layer, and converted models
of the common architectures keep their function, train through the schedule and go back to their own
class (save_pretrained / from_pretrained).  Tiny configs built in the test: nothing is downloaded."""

import copy
import logging
import re

import pytest
import torch
from torch import nn

from _helpers import rel_err
from dynrank import DynamicRankScheduler, FusedLowRankLinear, convert_model, unconvert_model
from dynrank.linear import is_transposed_linear

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 50
SITES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=VOCAB,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def tokens(seed=1, batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def conv1d(nf, nx, seed=0):
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx).double()
    with torch.no_grad():
        layer.bias.normal_()
    return layer


# -- the layer -----------------------------------------------------------------------------------------


def test_transformers_subclasses_with_their_own_forward():
    """BiT's weight-standardized conv computes more than the product with its weight and stays dense;
    Falcon's FalconLinear writes out x·Wᵀ + b and converts."""
    from transformers.models.bit.modeling_bit import WeightStandardizedConv2d
    from transformers.models.falcon.modeling_falcon import FalconLinear
    torch.manual_seed(0)
    model = nn.Sequential(WeightStandardizedConv2d(3, 16, 3, padding=1), nn.Flatten(),
                          FalconLinear(16 * 16, 32), nn.Linear(32, 4)).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ref = model(x)
    summary = convert_model(model, form="full")
    assert dict(summary.skipped) == {"0": "own computation (WeightStandardizedConv2d.forward)",
                                     "3": "final classifier"}
    assert type(model[2]) is FusedLowRankLinear and rel_err(model(x), ref) < 1e-12


def test_conv1d_is_recognised_by_class():
    class Derived(Conv1D):
        pass

    class Conv1D_(nn.Module):          # a user's own class of another name
        pass

    user_conv1d = type("Conv1D", (nn.Module,), {})      # same name, not from transformers
    assert is_transposed_linear(Conv1D(4, 3)) and is_transposed_linear(Derived(4, 3))
    assert not is_transposed_linear(Conv1D_()) and not is_transposed_linear(user_conv1d())
    assert not is_transposed_linear(nn.Linear(3, 4))


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("nf, nx", [(12, 12), (20, 12)])
def test_from_dense_conv1d_computes_its_function(form, nf, nx):
    """Square included: read as (out, in) without the transpose, a square Conv1D gives a layer that
    runs and computes x·Wᵀ instead of x·W."""
    dense = conv1d(nf, nx)
    layer = FusedLowRankLinear.from_dense(dense, rank=min(nf, nx), form=form)
    assert (layer.in_features, layer.out_features, layer.form) == (nx, nf, form)
    x = torch.randn(3, 5, nx, dtype=torch.float64)
    assert rel_err(layer(x), dense(x)) < 1e-12
    if form != "lowrank":
        assert torch.equal(layer.weight, dense.weight.t())
        assert layer.weight.is_contiguous()
    assert layer._dense_type is Conv1D
    assert copy.deepcopy(layer)._dense_type is Conv1D


# -- convert_model on GPT-2 ----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_convert_gpt2_keeps_its_function(form):
    model = gpt2()
    ids = tokens()
    ref = logits(model, ids)
    summary = convert_model(model, rank_ratio=1.0, form=form)
    expected = [f"transformer.h.{i}.{site}" for i in range(2) for site in SITES]
    assert sorted(summary.converted) == sorted(expected)
    assert dict(summary.skipped) == {"lm_head": "weight tied to transformer.wte.weight"}
    rows = {r["name"]: r for r in summary.rows}
    assert rows["transformer.h.0.attn.c_attn"]["type"] == "Conv1D"
    assert rows["transformer.h.0.attn.c_attn"]["rank"] == 32          # min(32, 96) at ρ = 1
    assert "Conv1D → FusedLowRankLinear" in str(summary)
    c_attn = model.transformer.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features, c_attn.form) == (32, 96, form)
    assert rel_err(logits(model, ids), ref) < 1e-12


def test_convert_gpt2_rank_ratio_and_rules():
    model = gpt2()
    summary = convert_model(model, rank_ratio=0.25, include="transformer.h.0.*", exclude="*.c_proj")
    assert sorted(summary.converted) == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    assert model.transformer.h[0].mlp.c_fc.rank == 8                   # int(0.25·min(32, 128))
    assert isinstance(model.transformer.h[1].mlp.c_fc, Conv1D)
    with pytest.raises(ValueError, match=r"match no nn.Linear/nn.Conv2d/Conv1D.*'transformer\.h\.9\.\*'"):
        convert_model(gpt2(), include="transformer.h.9.*")


def test_convert_conv1d_fresh_init_and_frozen():
    model = gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to convert.*frozen"):
        convert_model(model, form="lowrank")
    convert_model(model, rank_ratio=0.5, form="adapter", init="fresh")
    layer = model.transformer.h[1].mlp.c_proj
    assert layer._dense_type is Conv1D and layer.form == "adapter"
    assert not layer.weight.requires_grad and layer.A.requires_grad and not layer.bias.requires_grad


# -- training through the schedule, and back to transformers --------------------------------------------


def test_gpt2_trains_through_the_schedule_and_saves_as_gpt2(tmp_path):
    """Lowrank → full at epoch 1 → adapter at epoch 2, AdamW steps in each, then unconvert_model: every
    former Conv1D is a Conv1D with an (in, out) weight, and save_pretrained / from_pretrained give the
    trained model's logits."""
    model = gpt2()
    ids = tokens(seed=2, batch=4)
    convert_model(model, rank_ratio=0.5)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = DynamicRankScheduler(model, opt, inflate_epoch=1, deflate_epoch=2)
    losses = []
    for epoch in range(3):
        sched.step(epoch)
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert model.transformer.h[0].attn.c_attn.form == "adapter"
    assert losses[-1] < losses[0]
    model.eval()
    trained = logits(model, ids)

    summary = unconvert_model(model)
    assert len(summary) == 8 and {r["new_type"] for r in summary.rows} == {"Conv1D"}
    for block in model.transformer.h:
        for site in SITES:
            layer = block.get_submodule(site)
            assert type(layer) is Conv1D
            assert layer.weight.shape == (layer.nx, layer.nf) and layer.weight.is_contiguous()
    assert rel_err(logits(model, ids), trained) < 1e-12

    model.save_pretrained(tmp_path)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)     # loads float64 on transformers 4 (default dtype) and 5 (saved)
    try:
        loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    finally:
        torch.set_default_dtype(default)
    assert loaded.transformer.h[0].attn.c_attn.weight.dtype == torch.float64
    assert rel_err(logits(loaded, ids), trained) < 1e-12


@pytest.mark.parametrize("lowrank, kind", [("dense", Conv1D), ("factored", nn.Sequential)])
def test_unconvert_lowrank_conv1d(lowrank, kind):
    model = gpt2()
    convert_model(model, rank_ratio=0.25)
    ids = tokens()
    ref = logits(model, ids)
    unconvert_model(model, lowrank=lowrank)
    assert isinstance(model.transformer.h[0].mlp.c_fc, kind)
    assert rel_err(logits(model, ids), ref) < 1e-12


def test_unconvert_full_conv1d_weight_trains_where_w_did():
    model = gpt2()
    convert_model(model, form="full")
    layer = model.transformer.h[0].attn.c_attn
    W, bias = layer.weight, layer.bias
    unconvert_model(model)
    new = model.transformer.h[0].attn.c_attn
    assert new.weight.requires_grad and new.weight is not W and new.bias is bias
    assert torch.equal(new.weight, W.detach().t())
    assert new.weight.grad_fn is None and new.weight.is_leaf


# -- the other architectures: nn.Linear models -----------------------------------------------------------


def _bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _mobilebert():
    return transformers.MobileBertForMaskedLM(transformers.MobileBertConfig(
        vocab_size=VOCAB, hidden_size=32, embedding_size=16, intra_bottleneck_size=16, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=32, true_hidden_size=16, num_feedforward_networks=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


MODELS = {"bert": (_bert, 13), "llama": (_llama, 14), "vit": (_vit, 13), "mobilebert": (_mobilebert, 20)}


def _model_and_inputs(kind):
    torch.manual_seed(0)
    model = MODELS[kind][0]().double().eval()
    if kind == "vit":
        return model, {"pixel_values": torch.randn(2, 3, 16, 16, dtype=torch.float64)}
    return model, {"input_ids": tokens()}


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_linear_models_keep_their_function_in_each_form(kind, form):
    """ViTModel reads its patch embedding's ``projection.weight.dtype``, None in lowrank form: that conv
    stays dense there, by the rule that reads the transformers classes' code."""
    model, inputs = _model_and_inputs(kind)
    with torch.no_grad():
        ref = model(**inputs).logits
    summary = convert_model(model, rank_ratio=1.0, form=form)
    reads = kind == "vit" and form == "lowrank"
    assert len(summary.converted) == MODELS[kind][1] - reads
    if reads:
        assert dict(summary.skipped)["vit.embeddings.patch_embeddings.projection"] == \
            "ViTModel reads embeddings.patch_embeddings.projection.weight.dtype (None in lowrank form)"
    ran = set()
    for name in summary.converted:          # every converted layer's own forward runs: none is bypassed
        model.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: ran.add(name))
    with torch.no_grad():
        assert rel_err(model(**inputs).logits, ref) < 1e-12
    assert ran == set(summary.converted)


def test_layers_whose_weight_transformers_reads_stay_dense():
    """MobileBERT's MLM head multiplies by ``dense.weight`` itself and the Mamba mixers by their
    projections' weights: converted, their adapters would be skipped.  Named in include, they convert."""
    model = _mobilebert()
    summary = convert_model(model)
    assert dict(summary.skipped)["cls.predictions.dense"] == ("MobileBertLMPredictionHead uses "
                                                              "dense.weight itself (would skip the factors)")
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32,
                                                                   num_hidden_layers=2, state_size=4))
    summary = convert_model(mamba)
    kept = {name for name, note in summary.skipped if "MambaMixer uses" in note}
    assert kept == {f"backbone.layers.{i}.mixer.{p}" for i in range(2) for p in ("x_proj", "dt_proj", "out_proj")}
    assert sorted(summary.converted) == ["backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.in_proj"]
    assert convert_model(_mobilebert(), include="cls.predictions.dense").converted == ["cls.predictions.dense"]


def _wavlm():
    torch.manual_seed(0)
    config = transformers.WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                      conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=2)
    inputs = {"input_values": torch.randn(2, 800, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    return transformers.WavLMModel(config).double().eval(), inputs, {
        f"encoder.layers.{i}.attention.{p}": "WavLMAttention" for i in range(2)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


def _layoutlmv3():
    torch.manual_seed(0)
    config = transformers.LayoutLMv3Config(vocab_size=VOCAB, hidden_size=48, coordinate_size=8, shape_size=8,
                                           num_hidden_layers=2, num_attention_heads=8, intermediate_size=64,
                                           visual_embed=False, max_position_embeddings=64)
    corner = torch.randint(0, 500, (2, 12, 2), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": tokens(), "bbox": torch.cat([corner, corner + 10], -1)}
    return transformers.LayoutLMv3Model(config).double().eval(), inputs, {
        f"encoder.{p}": "LayoutLMv3Encoder" for p in ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias")}


@pytest.mark.parametrize("build", [_wavlm, _layoutlmv3], ids=["wavlm", "layoutlmv3"])
def test_layers_whose_weight_transformers_code_uses_stay_dense(build):
    """WavLM's attention passes ``q/k/v/out_proj.weight`` to ``F.multi_head_attention_forward`` and
    LayoutLMv3 indexes its relative-position biases' weights: kept dense, the adapter model computes its
    own merge (every adapter in the output and trained), and the lowrank model runs."""
    model, inputs, readers = build()
    summary = convert_model(model, rank_ratio=0.5, form="adapter")
    skipped = dict(summary.skipped)
    for name, owner in readers.items():
        attr = name.rsplit(".", 1)[1]
        assert skipped[name] == f"{owner} uses {attr}.weight itself (would skip the factors)"
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    torch.manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, FusedLowRankLinear):
            with torch.no_grad():
                layer.A.normal_(0, 0.3)
    out = model(**inputs).last_hidden_state
    out.pow(2).mean().backward()
    assert rel_err(out, ref) > 1e-3                   # the adapters change the output
    merged = copy.deepcopy(model)
    unconvert_model(merged)
    with torch.no_grad():
        assert rel_err(out, merged(**inputs).last_hidden_state) < 1e-12
    assert all(model.get_submodule(name).A.grad is not None for name in summary.converted)
    lowrank, inputs, _ = build()
    original = copy.deepcopy(lowrank)
    summary = convert_model(lowrank, rank_ratio=0.5)
    assert set(readers) <= {name for name, _ in summary.skipped}
    for name in readers:                              # kept as they were
        assert torch.equal(lowrank.get_submodule(name).weight, original.get_submodule(name).weight)
    # The lowrank model computes its layers' products: as the model with each one a dense s·A·Bᵀ.
    merged = copy.deepcopy(lowrank)
    unconvert_model(merged)
    with torch.no_grad():
        out = lowrank(**inputs).last_hidden_state
        assert rel_err(out, merged(**inputs).last_hidden_state) < 1e-12
        assert rel_err(out, original(**inputs).last_hidden_state) > 1e-3      # rank 0.5 changes it


@pytest.mark.parametrize("rescale_every", [1, 2])
@pytest.mark.parametrize("form", ["adapter", "lowrank"])
def test_rwkv_keeps_the_layers_it_rescales_dense(form, rescale_every):
    """RwkvModel divides ``attention.output`` and ``feed_forward.value``'s weights in place at the first forward
    after each train/eval switch (multiplies them back in training), through a loop the code search does not
    follow: converted, an adapter layer's factors were left unscaled (0.41 off in eval) and a lowrank one
    raised an AttributeError.  Kept dense, the converted model computes what its merged copy does.  Any
    ``rescale_every`` > 0 rescales, 1 (every block) included."""
    torch.manual_seed(0)
    config = transformers.RwkvConfig(vocab_size=VOCAB, context_length=16, hidden_size=32, num_hidden_layers=4,
                                     attention_hidden_size=32, intermediate_size=64, rescale_every=rescale_every)
    model = transformers.RwkvForCausalLM(config).double().train()
    summary = convert_model(model, rank_ratio=0.5, form=form)
    skipped = dict(summary.skipped)
    for i in range(4):
        for path in ("attention.output", "feed_forward.value"):
            assert skipped[f"rwkv.blocks.{i}.{path}"] == f"RwkvModel uses blocks.{i}.{path}.weight itself (would " \
                                                         f"skip the factors)"
    torch.manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, FusedLowRankLinear) and layer.form == "adapter":
            with torch.no_grad():
                layer.A.normal_(0, 0.3)
    merged = copy.deepcopy(model)
    unconvert_model(merged)
    ids = tokens()
    for mode in ("eval", "train", "eval"):          # each switch rescales
        getattr(model, mode)(), getattr(merged, mode)()
        with torch.no_grad():
            assert rel_err(model(ids).logits, merged(ids).logits) < 1e-12


def _t5(dtype=torch.float64):
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0)).to(dtype).eval()


def test_unconverted_lowrank_t5_keeps_wo_a_module_with_a_weight():
    """T5's feed-forward reads ``wo.weight`` (an ``isinstance`` check): the default factored unconvert
    gives ``wo`` one dense Linear, and the model runs and generates as the converted one did."""
    t5 = _t5()
    convert_model(t5, rank_ratio=0.5)
    ids = tokens()
    with torch.no_grad():
        ref = t5(input_ids=ids, decoder_input_ids=ids).logits
    ref_generated = t5.generate(ids, max_new_tokens=5, do_sample=False)
    summary = unconvert_model(t5)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    assert type(t5.get_submodule(wo)) is nn.Linear
    assert dict((r["name"], r["note"]) for r in summary.rows)[wo] == "dense: T5DenseActDense reads wo.weight"
    assert isinstance(t5.get_submodule("encoder.block.0.layer.1.DenseReluDense.wi"), nn.Sequential)
    with torch.no_grad():
        assert rel_err(t5(input_ids=ids, decoder_input_ids=ids).logits, ref) < 1e-12
    assert torch.equal(t5.generate(ids, max_new_tokens=5, do_sample=False), ref_generated)


def test_t5_in_float16_keeps_its_float32_wo_dense_in_lowrank_form():
    """Loaded in float16, T5 keeps ``wo`` in float32 (``_keep_in_fp32_modules``) and casts its input to
    ``wo.weight.dtype``: in lowrank form ``wo`` stays dense, and the model runs as before."""
    t5 = _t5(torch.float16)
    for module in t5.modules():
        if isinstance(module, transformers.models.t5.modeling_t5.T5DenseActDense):
            module.wo.float()
    ids = tokens()
    with torch.no_grad():
        ref = t5(input_ids=ids, decoder_input_ids=ids).logits
    summary = convert_model(t5, rank_ratio=1.0)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    assert dict(summary.skipped)[wo] == ("T5DenseActDense casts its input to wo.weight.dtype (float32, unlike its "
                                         "other parameters), a cast skipped in lowrank form")
    assert "encoder.block.0.layer.1.DenseReluDense.wi" in summary.converted
    with torch.no_grad():
        assert rel_err(t5(input_ids=ids, decoder_input_ids=ids).logits, ref) < 1e-2


def test_dtype_reads_follow_numbered_indices():
    from dynrank._readers import _dtype_reads

    class Reader(nn.Module):          # as Florence-2's vision backbone reads its first conv
        def forward(self, x):
            return x.to(self.convs[0].conv.weight.dtype) + x.to(self.proj.weight.device)

    assert _dtype_reads(Reader) == ("convs.0.conv", "proj")


def test_dtype_reads_in_transformers_code_are_found_where_unguarded():
    """CLIP's vision embeddings read ``patch_embedding.weight.dtype``; T5's feed-forward reads
    ``wo.weight.dtype`` only after ``isinstance(self.wo.weight, torch.Tensor)``, so ``wo`` converts."""
    from dynrank._readers import _dtype_reads
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
    from transformers.models.t5.modeling_t5 import T5DenseActDense
    assert _dtype_reads(CLIPVisionEmbeddings) == ("patch_embedding",)
    assert _dtype_reads(T5DenseActDense) == ()
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0)).double().eval()
    ids = tokens()
    with torch.no_grad():
        ref = t5(input_ids=ids, decoder_input_ids=ids).logits
    summary = convert_model(t5, rank_ratio=1.0)
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in summary.converted
    with torch.no_grad():
        assert rel_err(t5(input_ids=ids, decoder_input_ids=ids).logits, ref) < 1e-12


@pytest.mark.parametrize("kind", list(MODELS))
def test_linear_models_frozen_train_their_adapters_only(kind):
    model, inputs = _model_and_inputs(kind)
    for p in model.parameters():
        p.requires_grad_(False)
    convert_model(model, rank_ratio=0.25, form="adapter")
    model(**inputs).logits.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.endswith((".A", ".B")) for n in trained)


# -- DynamicRankCallback: the schedule inside transformers.Trainer ---------------------------------------


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.ids = torch.randint(0, VOCAB, (n, 12), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _TokenStream(torch.utils.data.IterableDataset):
    """The same examples with no length: the Trainer runs it by ``max_steps``."""

    def __init__(self, n):
        self.data = _Tokens(n)

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def _converted_gpt2(**convert_kwargs):
    """A tiny GPT-2 in float32 converted at rank_ratio 0.5, with ``convert_kwargs`` for :func:`convert_model`."""
    model = gpt2(dtype=torch.float32)
    convert_model(model, rank_ratio=0.5, **convert_kwargs)
    return model


def _trainer(out_dir, callback, epochs=4, save="epoch", data=None, eval_data=None, model=None, **arguments):
    """A Trainer of a converted tiny GPT-2 (batch 8: 4 optimizer steps per epoch of ``_Tokens()``)."""
    pytest.importorskip("accelerate")
    model = model or _converted_gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=epochs, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy=save, use_cpu=True, disable_tqdm=True,
        **{"logging_steps": 4, "seed": 0, **arguments})
    return transformers.Trainer(model=model, args=args, train_dataset=data or _Tokens(), eval_dataset=eval_data,
                                callbacks=[callback])


def _train(out_dir, callback, resume=None, **kwargs):
    trainer = _trainer(out_dir, callback, **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer.model, trainer


def test_callback_runs_the_schedule_in_a_trainer(tmp_path):
    from dynrank.hf import DynamicRankCallback
    lines = []
    callback = DynamicRankCallback(1, 3, log=lines.append)
    model, trainer = _train(tmp_path, callback, save="no")
    assert [(count, old, new) for count, _, old, new in callback.changes] == \
        [(1, "lowrank", "full")] * 8 + [(3, "full", "adapter")] * 8
    assert lines == ["dynrank: epoch 1: 8 layers lowrank → full", "dynrank: epoch 3: 8 layers full → adapter"]
    assert callback.scheduler.last_epoch == 3 and callback.scheduler.model is model
    # The optimizer holds exactly the trainable parameters, and the LR schedule ran on (linear decay).
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    rates = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert len(rates) == 4 and all(a > b for a, b in zip(rates, rates[1:]))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_callback_logs_the_switch_of_a_single_layer(tmp_path):
    from dynrank.hf import DynamicRankCallback
    lines = []
    model = _converted_gpt2(include="transformer.h.0.mlp.c_fc")
    _train(tmp_path, DynamicRankCallback(1, None, log=lines.append), model=model, epochs=2, save="no",
           data=_Tokens(8))
    assert lines == ["dynrank: epoch 1: 1 layer lowrank → full"]
    assert model.transformer.h[0].mlp.c_fc.form == "full"


def test_callback_resumes_bitwise_across_the_switches(tmp_path):
    """Resumed from the checkpoint before the inflate, before the deflate and in the adapter phase, the
    run ends with the uninterrupted run's weights, bit for bit (the deflate's fresh factors included).
    The checkpoints stay in the first run's folder, outside the resumed runs' output folders; with
    restore_callback_states_from_checkpoint=True the Trainer keeps the callback it was given."""
    from dynrank.hf import DynamicRankCallback
    reference, _ = _train(tmp_path / "full", DynamicRankCallback(1, 2, log=None))
    expected = reference.state_dict()
    for step in (4, 8, 12):                          # ends of epochs 0, 1 and 2
        checkpoint = tmp_path / "full" / f"checkpoint-{step}"
        callback = DynamicRankCallback(1, 2, log=None)
        resumed, trainer = _train(tmp_path / f"from-{step}", callback, resume=str(checkpoint),
                                  restore_callback_states_from_checkpoint=step == 8)
        assert callback in trainer.callback_handler.callbacks and callback.scheduler.model is resumed
        state = resumed.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), f"resumed from {checkpoint.name}"


def test_callback_resumes_bitwise_from_a_step_checkpoint_saved_before_an_evaluation(tmp_path):
    """A checkpoint at an epoch's last step is saved before the epoch's evaluation, which draws from the
    global RNG (its DataLoader's base seed) and which the resumed run skips: the deflate's fresh B, drawn
    from that RNG, differed (by up to 0.97).  A switch draws from a generator of the run's seed and its
    count instead, and leaves the global RNG as it was."""
    from dynrank.hf import DynamicRankCallback
    arguments = dict(save="steps", save_steps=4, eval_strategy="epoch", eval_data=_Tokens(8))
    reference, _ = _train(tmp_path / "full", DynamicRankCallback(1, 2, log=None), epochs=3, **arguments)
    expected = reference.state_dict()
    for step in (4, 8):                              # ends of epochs 0 and 1, before their evaluations
        resumed, _ = _train(tmp_path / f"from-{step}", DynamicRankCallback(1, 2, log=None), epochs=3,
                            resume=str(tmp_path / "full" / f"checkpoint-{step}"), **arguments)
        state = resumed.state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected), f"resumed from checkpoint-{step}"


@pytest.mark.parametrize("examples", [40, 32], ids=["pass-of-5-micro-batches", "pass-of-4"])
def test_callback_warns_of_a_switch_inside_a_gradient_accumulation(tmp_path, examples):
    """A streamed pass of 5 micro-batches under gradient_accumulation_steps=2 carries its last one's gradient
    into the next epoch's first step, where the inflate dropped the switched layers' share of it without a
    word while the other parameters stepped with it.  A pass of 4 leaves nothing pending."""
    import warnings

    from dynrank.hf import DynamicRankCallback
    callback = DynamicRankCallback(1, None, log=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(tmp_path, callback, data=_TokenStream(examples), save="no", max_steps=4, gradient_accumulation_steps=2)
    assert {new for _, _, _, new in callback.changes} == {"full"}
    pending = [str(w.message) for w in caught if "micro-batches not yet stepped" in str(w.message)]
    if examples == 40:
        assert len(pending) == 1 and pending[0].startswith("DynamicRankCallback switched at epoch 1 (global step 2)")
    else:
        assert pending == []


def _resume_at_quarter_rank(out_dir, checkpoint, epochs=3, **arguments):
    """Resume from ``checkpoint`` into a GPT-2 converted at rank_ratio 0.25 (ranks 8), saving nothing."""
    from dynrank.hf import DynamicRankCallback
    model = gpt2(dtype=torch.float32)
    convert_model(model, rank_ratio=0.25)
    callback = DynamicRankCallback(1, 2, log=None)
    _train(out_dir, callback, resume=str(checkpoint), model=model, epochs=epochs, save="no", **arguments)
    return callback, model


@pytest.mark.parametrize("restore", [False, True], ids=["plain", "restore-callback-states"])
def test_callback_refuses_a_resume_into_a_model_of_another_rank(tmp_path, restore):
    """A full-form checkpoint holds no rank: resumed into a model converted at rank_ratio 0.25 (ranks 8), the
    run would deflate to rank 8 where it deflated to 16.  The callback's state in the checkpoint's
    trainer_state.json has the ranks, as load_training_state's checkpoint does, and the resume is refused,
    from whatever folder.  Without that entry (an earlier version's checkpoint) it resumes unchecked and
    silently."""
    import json
    import shutil
    import warnings

    from dynrank.hf import DynamicRankCallback
    _train(tmp_path / "run", DynamicRankCallback(1, 2, log=None), epochs=3)
    checkpoint = tmp_path / "run" / "checkpoint-8"                            # end of epoch 1: full form
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = trainer_state["stateful_callbacks"]["dynrank"]
    assert set(saved["scheduler"]["forms"].values()) == {"full"} and set(saved["scheduler"]["ranks"].values()) == {16}
    assert saved["epochs_begun"] == [[0, 0], [1, 4]] and saved["epoch_ended"] is True

    flag = {"restore_callback_states_from_checkpoint": restore}
    with pytest.raises(ValueError, match=r"resuming at global step 8: the schedule's state in the checkpoint's "
                                         r"trainer_state\.json \(stateful_callbacks\['dynrank'\]\) does not fit "
                                         r"this model: layer '.*' has rank 8 but the checkpoint has 16 \(the rank "
                                         r"its next deflate takes\); convert the model with the same rank_ratio\. "
                                         r"The Trainer loads the checkpoint into the model"):
        _resume_at_quarter_rank(tmp_path / "elsewhere", checkpoint, **flag)
    old = tmp_path / "old" / checkpoint.name
    shutil.copytree(checkpoint, old)
    del trainer_state["stateful_callbacks"]["dynrank"]
    (old / "trainer_state.json").write_text(json.dumps(trainer_state))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, _ = _resume_at_quarter_rank(tmp_path / "elsewhere", old, **flag)
    assert not [w for w in caught if w.filename.endswith("hf.py")]
    assert callback.scheduler.forms() == dict.fromkeys(saved["scheduler"]["forms"], "adapter")
    assert {layer.rank for _, layer in callback.scheduler.layers} == {8}


def test_callback_resume_ignores_a_stale_checkpoint_of_the_same_step_in_output_dir(tmp_path):
    """A run at rank_ratio 0.25 resumed from its own checkpoint-8 into an output folder holding another run's
    checkpoint-8 (at rank_ratio 0.5) is checked against the checkpoint it loads, not the one there: it
    resumes, and ends with its uninterrupted run's weights."""
    from dynrank.hf import DynamicRankCallback
    _train(tmp_path / "stale", DynamicRankCallback(1, 2, log=None), epochs=3)
    quarter = gpt2(dtype=torch.float32)
    convert_model(quarter, rank_ratio=0.25)
    _train(tmp_path / "quarter", DynamicRankCallback(1, 2, log=None), model=quarter, epochs=3)
    _, resumed = _resume_at_quarter_rank(tmp_path / "stale", tmp_path / "quarter" / "checkpoint-8")
    expected, state = quarter.state_dict(), resumed.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert resumed.transformer.h[0].attn.c_attn.rank == 8


def test_callback_refused_resume_says_the_checkpoint_is_loaded(tmp_path):
    """The Trainer loads the checkpoint before any callback runs: a resume into the trained (adapter-form)
    model from a lowrank checkpoint is refused with the checkpoint's factors already in its adapters (the
    non-strict, adapter-only load: W_f stays), and the error says so."""
    from dynrank.hf import DynamicRankCallback
    model, trainer = _train(tmp_path, DynamicRankCallback(1, 2, log=None), epochs=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"training resumes at epoch 1, where the schedule has the layers in full "
                                         r"form, but 8 of them are in adapter form .*The Trainer loads the checkpoint "
                                         r"into the model before any callback runs .*build and convert a fresh model"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    state, name = model.state_dict(), "transformer.h.0.attn.c_attn"
    assert model.get_submodule(name).form == "adapter"
    assert not torch.equal(state[f"{name}.A"], before[f"{name}.A"])
    assert torch.equal(state[f"{name}.weight"], before[f"{name}.weight"])


def test_callback_resumes_an_iterable_dataset_run_where_its_epochs_began(tmp_path):
    """16 examples a pass, batch 8, max_steps=6: epochs begin at global steps 0, 2 and 4.  On a resume past
    the first epoch the Trainer starts the data anew, so resumed inside the first epoch, at its end, at
    the end of the second, or inside the third (no switch ahead) the run switches where the uninterrupted
    one did; inside the second, where the deflate is still ahead, it is refused (counted from the data's
    restart, the deflate came a step early), also from a checkpoint of a run that was itself resumed.
    Every resume reads a checkpoint outside its own output folder."""
    from dynrank.hf import DynamicRankCallback

    def run(out_dir, resume=None, save="steps"):
        switches, trainer = [], None
        callback = DynamicRankCallback(1, 2, log=lambda line: switches.append((trainer.state.global_step, line)))
        trainer = _trainer(out_dir, callback, save=save, save_steps=1, data=_TokenStream(16), max_steps=6)
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        return switches

    full = run(tmp_path / "full")
    assert [step for step, _ in full] == [2, 4]
    for step in (1, 2, 4, 5):
        expected = [switch for switch in full if switch[0] >= step]
        assert run(tmp_path / f"from-{step}", resume=tmp_path / "full" / f"checkpoint-{step}",
                   save="no" if step > 1 else "steps") == expected
    refused = r"resuming an IterableDataset run at global step 3, inside epoch 1 \(begun at step 2\).*switch at epoch 2"
    for run_dir in (tmp_path / "full", tmp_path / "from-1"):
        with pytest.raises(ValueError, match=refused):
            run(tmp_path / "again", resume=run_dir / "checkpoint-3", save="no")


def test_callback_resumes_a_streamed_run_from_a_checkpoint_of_a_resumed_run(tmp_path):
    """16 examples a pass, batch 8, max_steps=8, a constant learning rate: epochs begin at steps 0, 2, 4 and
    6.  A run resumed from checkpoint-4 (the end of epoch 1) saves a state.epoch the Trainer counts from its
    own loop, which starts again at 0 on a resume: 1.125 at step 5, inside epoch 2.  Resumed from its
    checkpoint-6 (the end of epoch 2, the deflate at epoch 3 ahead) the run ends with the uninterrupted run's
    weights and switches, bit for bit; from its checkpoint-5 (inside epoch 2, where the deflate at 2 is made
    and none is ahead) with those of the resume from the uninterrupted run's checkpoint-5 (both start the
    data anew).  And 40 examples a pass (5 steps), max_steps=4 (state.epoch 1.0 at the last step, inside
    epoch 0), continued to max_steps=8: the run inflates where the uninterrupted one did, at step 6."""
    from dynrank.hf import DynamicRankCallback

    def run(out_dir, deflate, resume=None, examples=16, max_steps=8):
        callback = DynamicRankCallback(1, deflate, log=None)
        model, _ = _train(out_dir, callback, resume=None if resume is None else str(resume), save="steps",
                          save_steps=1, data=_TokenStream(examples), max_steps=max_steps,
                          lr_scheduler_type="constant")
        return model.state_dict(), callback.changes

    def same(state, expected):
        return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)

    full, full_changes = run(tmp_path / "full", 3)
    assert sorted({change[0] for change in full_changes}) == [1, 3]
    run(tmp_path / "resumed", 3, resume=tmp_path / "full" / "checkpoint-4")
    state, changes = run(tmp_path / "again", 3, resume=tmp_path / "resumed" / "checkpoint-6")
    assert same(state, full)
    assert changes == [change for change in full_changes if change[0] == 3] and len(changes) == 8

    run(tmp_path / "full-2", 2)
    run(tmp_path / "resumed-2", 2, resume=tmp_path / "full-2" / "checkpoint-4")
    expected, _ = run(tmp_path / "from-full", 2, resume=tmp_path / "full-2" / "checkpoint-5")
    state, changes = run(tmp_path / "again-2", 2, resume=tmp_path / "resumed-2" / "checkpoint-5")
    assert same(state, expected) and changes == []

    full, full_changes = run(tmp_path / "one-pass", 2, examples=40)
    assert {change[0] for change in full_changes} == {1}
    run(tmp_path / "cut", 2, examples=40, max_steps=4)
    state, changes = run(tmp_path / "cut", 2, resume=tmp_path / "cut" / "checkpoint-4", examples=40)
    assert same(state, full) and changes == full_changes


def test_callback_checks_deflate_rank_at_construction():
    from dynrank.hf import DynamicRankCallback
    for bad, error, message in [(-1, ValueError, "deflate_rank must be a rank >= 1 .*got -1"),
                                (0, ValueError, "deflate_rank must be a rank >= 1 .*got 0"),
                                (1.5, ValueError, r"deflate_rank is a float, a rank ratio, which must be in \(0, 1\], "
                                                  r"got 1\.5"),
                                (float("nan"), ValueError, "got nan"),
                                ("big", TypeError, r"deflate_rank must be an int, a float ratio in \(0, 1\], a dict "
                                                   r"of them or None, got str \('big'\)"),
                                (True, TypeError, "got bool"),
                                ({"transformer.h.0.mlp.c_fc": -2}, ValueError,
                                 r"deflate_rank\['transformer\.h\.0\.mlp\.c_fc'\] must be a rank >= 1"),
                                ({"transformer.h.0.mlp.c_fc": {}}, TypeError, "got dict")]:
        with pytest.raises(error, match=message):
            DynamicRankCallback(1, 2, deflate_rank=bad)
    for good in (None, 4, 0.5, 1.0, {"transformer.h.0.mlp.c_fc": None, "transformer.h.1.mlp.c_fc": 0.25}):
        DynamicRankCallback(1, 2, deflate_rank=good)


@pytest.mark.parametrize("policy", ["reset", "fresh"])
def test_callback_takes_the_optimizer_state_policy(tmp_path, policy):
    """optimizer_state="fresh" reaches the scheduler: the Trainer's optimizer holds no state right after each
    switch (AdamW builds it at its first step); with "reset" the parameters a switch keeps (biases, layer
    norms, embeddings) keep theirs."""
    from dynrank.hf import DynamicRankCallback
    callback = DynamicRankCallback(1, 3, log=None, optimizer_state=policy)
    held = []

    class Watch(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            callback.scheduler.add_callback(lambda event: held.append(len(optimizer.state)))
    trainer = _trainer(tmp_path, callback, save="no")
    trainer.add_callback(Watch())
    trainer.train()
    assert callback.scheduler.optimizer_state == policy
    assert len(held) == 2 and all((count == 0) == (policy == "fresh") for count in held), held


def test_callback_deflates_to_fresh_factors_of_the_runs_seed(tmp_path):
    """Runs of a seed sweep draw their own fresh B at the deflate: the switch's generator is seeded by
    args.seed as well as the epoch."""
    from dynrank.hf import DynamicRankCallback
    drawn = {}
    for seed in (1, 2):
        callback = DynamicRankCallback(0, 1, log=None)
        trainer = _trainer(tmp_path / str(seed), callback, epochs=2, save="no", data=_Tokens(8), seed=seed)
        layer = trainer.model.transformer.h[0].attn.c_attn

        class Watch(transformers.TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                callback.scheduler.add_callback(
                    lambda event: drawn.setdefault(seed, layer.B.detach().clone()) if layer.form == "adapter" else None)
        trainer.add_callback(Watch())
        trainer.train()
    assert drawn.keys() == {1, 2} and all(bool(b.any()) for b in drawn.values())
    assert not torch.equal(drawn[1], drawn[2])


def test_callback_by_steps(tmp_path):
    from dynrank.hf import DynamicRankCallback
    callback = DynamicRankCallback(5, 10, unit="step", log=None)
    model, _ = _train(tmp_path, callback, epochs=3, save="no")
    assert sorted({(count, old, new) for count, _, old, new in callback.changes}) == \
        [(5, "lowrank", "full"), (10, "full", "adapter")]
    assert model.transformer.h[1].mlp.c_fc.form == "adapter"


def test_callback_refuses_bad_setups():
    from types import SimpleNamespace

    from dynrank.hf import DynamicRankCallback
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) epoch_unit; it takes deflate_init"):
        DynamicRankCallback(1, 2, epoch_unit="step")
    with pytest.raises(ValueError, match="deflate_epoch"):
        DynamicRankCallback(3, 2)
    with pytest.raises(TypeError, match="log must be callable or None, got str"):
        DynamicRankCallback(1, 2, log="stdout")
    model = gpt2()
    convert_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="runs on one process.*this Trainer runs 2 processes"):
        DynamicRankCallback(1, 2).on_train_begin(SimpleNamespace(world_size=2), None, None, model=model,
                                                  optimizer=optimizer)
    with pytest.raises(ValueError, match="no dynrank layers"):
        DynamicRankCallback(1, 2).on_train_begin(SimpleNamespace(world_size=1), None, None, model=gpt2(),
                                                  optimizer=optimizer)


@pytest.mark.parametrize("epochs", [None, 5])
def test_callback_switches_where_the_loop_epochs_begin_with_an_iterable_dataset(tmp_path, epochs):
    """16 examples a pass, batch 8: epochs begin at global steps 0, 2 and 4 of max_steps=6, where
    state.epoch (step / max_steps) would say 0, 0.33 and 0.67.  The run's length in epochs is unknown
    (the Trainer says sys.maxsize): a schedule's epochs= is not held against it."""
    from dynrank.hf import DynamicRankCallback
    at = []
    trainer = None

    def log(line):
        at.append((trainer.state.global_step, line))
    callback = DynamicRankCallback(1, 2, log=log, **({} if epochs is None else {"epochs": epochs}))
    trainer = _trainer(tmp_path, callback, save="no", data=_TokenStream(16), max_steps=6)
    trainer.train()
    assert at == [(2, "dynrank: epoch 1: 8 layers lowrank → full"),
                  (4, "dynrank: epoch 2: 8 layers full → adapter")]


def test_callback_refuses_a_second_train_call(tmp_path):
    from dynrank.hf import DynamicRankCallback
    model, trainer = _train(tmp_path, DynamicRankCallback(1, 2, log=None), epochs=3, save="no")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"training starts at epoch 0, where the schedule has the layers in "
                                         r"lowrank form, but 8 of them are in adapter form already "
                                         r".*second trainer\.train\(\)"):
        trainer.train()
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)


@pytest.mark.parametrize("unit, epochs, arguments, runs", [
    ("epoch", 3, {}, "num_train_epochs=4 (4 epochs)"),
    ("epoch", 2, {"epochs": 2.5}, "num_train_epochs=2.5 (3 epochs)"),
    ("epoch", 4, {"max_steps": 20}, "max_steps=20 (5 epochs)"),       # 4 steps an epoch; num_train_epochs=4
    ("step", 6, {"max_steps": 8}, "max_steps=8 optimizer steps"),
    ("step", 6, {}, "16 optimizer steps (num_train_epochs=4)")])
def test_callback_refuses_a_run_longer_than_its_epochs(tmp_path, unit, epochs, arguments, runs):
    # Refused before the first step, not by the scheduler's range check once the schedule runs out.
    from dynrank.hf import DynamicRankCallback
    trainer = _trainer(tmp_path, DynamicRankCallback(1, 2, unit=unit, epochs=epochs, log=None), save="no",
                       **arguments)
    with pytest.raises(ValueError, match=re.escape(f"DynamicRankCallback(epochs={epochs}) schedules {epochs} "
                                                   f"{unit}s, but this Trainer runs {runs}")):
        trainer.train()
    assert trainer.state.global_step == 0


def test_callback_runs_a_step_schedule_as_long_as_its_epochs(tmp_path):
    from dynrank.hf import DynamicRankCallback
    callback = DynamicRankCallback(1, 3, unit="step", epochs=4, log=None)
    _train(tmp_path, callback, save="no", max_steps=4)
    assert sorted({(count, old, new) for count, _, old, new in callback.changes}) == \
        [(1, "lowrank", "full"), (3, "full", "adapter")]


def test_callback_with_fused_sgd_trains_as_unfused_sgd_across_the_switches(tmp_path):
    """The Trainer hands callbacks Accelerate's wrapper of the optimizer: the parameters a switch brings
    got no zero momentum buffer beside the trained ones', and fused SGD failed the next step with a bare
    TypeError ("expected Tensor as element 1 in argument 2, but got NoneType")."""
    from dynrank.hf import DynamicRankCallback
    pytest.importorskip("accelerate")
    models = []
    for fused in (True, False):
        model = _converted_gpt2()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=fused, foreach=False)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(fused)), num_train_epochs=3, per_device_train_batch_size=8,
            report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(optimizer, None),
                                       callbacks=[DynamicRankCallback(1, 2, log=None)])
        trainer.train()
        assert type(trainer.optimizer) is not torch.optim.SGD      # the wrapper, as the callback saw it
        models.append(model.state_dict())
    fused, plain = models
    assert fused.keys() == plain.keys()
    assert max(rel_err(fused[k], plain[k]) for k in fused) < 1e-5


@pytest.mark.parametrize("inflate, deflate, refused", [(1, 2, True), (1, 3, False), (1, 5, False), (0, 2, False)])
def test_callback_and_load_best_model_at_end(tmp_path, inflate, deflate, refused):
    """With the deflate inside the run the best checkpoint could be lowrank: refused.  With the run ending
    in full form (3 epochs end before a deflate at epoch 3), the best checkpoint (the first, by a metric that
    prefers higher losses) comes back whole: lowrank, with its own factors.  Without a lowrank phase
    (inflate at 0) no checkpoint is lowrank: the adapter-form model takes back the full-form first one."""
    from dynrank.hf import DynamicRankCallback
    trainer = _trainer(tmp_path, DynamicRankCallback(inflate, deflate, log=None), epochs=3, eval_strategy="epoch",
                       load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                       eval_data=_Tokens(16))
    if refused:
        with pytest.raises(ValueError, match=r"load_best_model_at_end=True with this schedule \(lowrank until epoch "
                                             r"1, adapter from 2\) could load a checkpoint saved in lowrank form"):
            trainer.train()
        assert trainer.model.transformer.h[0].attn.c_attn.form == "lowrank"
        return
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    saved = gpt2(dtype=torch.float32)
    convert_model(saved, rank_ratio=0.5)
    from safetensors.torch import load_file
    saved.load_state_dict(load_file(str(tmp_path / "checkpoint-4" / "model.safetensors")), strict=False)
    assert trainer.model.transformer.h[0].attn.c_attn.form == ("full" if inflate == 0 else "lowrank")
    expected, state = saved.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("unit, deflate, streamed, refused", [
    ("step", 8, False, False), ("step", 7, False, True), ("epoch", 2, True, True)],
    ids=["step-deflate-at-max-steps", "step-deflate-inside", "streamed"])
def test_callback_and_load_best_model_at_end_of_a_run_by_max_steps(tmp_path, unit, deflate, streamed, refused):
    """max_steps=8, checkpoints and evaluations at steps 4 and 8.  By steps, a deflate at step 8 comes after
    the last step: the run ends in full form and the best checkpoint (checkpoint-4, lowrank) comes back
    whole; one at step 7 is inside the run: refused.  With streamed data the run's length in epochs is
    unknown, so a deflate at epoch 2 may come inside it: refused."""
    from dynrank.hf import DynamicRankCallback
    inflate = 4 if unit == "step" else 1
    trainer = _trainer(tmp_path, DynamicRankCallback(inflate, deflate, unit=unit, log=None), save="steps",
                       save_steps=4, eval_strategy="steps", eval_steps=4, max_steps=8,
                       data=_TokenStream(16) if streamed else None, load_best_model_at_end=True,
                       metric_for_best_model="loss", greater_is_better=True, eval_data=_Tokens(16))
    if refused:
        with pytest.raises(ValueError, match=re.escape(f"load_best_model_at_end=True with this schedule (lowrank "
                                                       f"until {unit} {inflate}, adapter from {deflate})")):
            trainer.train()
        assert trainer.state.global_step == 0
        assert trainer.model.transformer.h[0].attn.c_attn.form == "lowrank"
        return
    trainer.train()
    assert trainer.state.global_step == 8 and trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    saved = gpt2(dtype=torch.float32)
    convert_model(saved, rank_ratio=0.5)
    from safetensors.torch import load_file
    saved.load_state_dict(load_file(str(tmp_path / "checkpoint-4" / "model.safetensors")), strict=False)
    assert trainer.model.transformer.h[0].attn.c_attn.form == "lowrank"
    expected, state = saved.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_callback_refuses_deepspeed_and_fsdp():
    from types import SimpleNamespace

    from dynrank.hf import DynamicRankCallback
    model = gpt2()
    convert_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for engine, setting in (("DeepSpeed", {"deepspeed": "ds.json"}), ("FSDP", {"fsdp": ["full_shard"]})):
        args = SimpleNamespace(world_size=1, **setting)
        with pytest.raises(ValueError, match=f"cannot run under {engine}"):
            DynamicRankCallback(1, 2).on_train_begin(args, None, None, model=model, optimizer=optimizer)


# -- state dicts and unconversion of Conv1D layers: the details ---------------------------------------------


def test_plain_gpt2_state_dict_into_a_converted_model_names_conv1d_layout():
    plain = gpt2().state_dict()
    model = gpt2(seed=1)
    convert_model(model, form="full")
    with pytest.raises(RuntimeError, match=r"weight must have shape \(96, 32\) \(full form\), got \(32, 96\) "
                                           r"\(Conv1D's \(in, out\) layout: .*load such a state dict into the model "
                                           r"before convert_model"):
        model.load_state_dict(plain)


@pytest.mark.parametrize("form", ["lowrank", "full", "adapter"])
def test_converted_gpt2_state_dict_saves_with_safetensors_and_aliases_its_parameters(form, tmp_path):
    """The converted model's state dict holds its parameters themselves, contiguous: safetensors (so
    Accelerate's save_state) saves it and it loads back; an update through the dict (an EMA kept on
    state_dict() values) reaches the model.  (Saving W transposed, in the Conv1D layout, broke both.)"""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    ids = tokens()
    model = gpt2()
    convert_model(model, form=form, rank_ratio=0.5)
    ref = logits(model, ids)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}      # tied to wte
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    other = gpt2(seed=3)
    convert_model(other, form=form, rank_ratio=0.5)
    other.load_state_dict(safetensors_torch.load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert rel_err(logits(other, ids), ref) < 1e-12
    layer = model.transformer.h[0].attn.c_proj
    name = "weight" if form != "lowrank" else "A"
    entry = model.state_dict()[f"transformer.h.0.attn.c_proj.{name}"]
    assert entry.data_ptr() == getattr(layer, name).data_ptr()
    entry.mul_(0.0)
    assert not getattr(layer, name).any()


def test_unconvert_conv1d_without_bias_and_the_factored_note():
    dense = conv1d(20, 12)
    layer = FusedLowRankLinear.from_dense(dense, rank=4, form="lowrank")
    layer.bias = None
    holder = nn.Sequential(layer)
    x = torch.randn(3, 12, dtype=torch.float64)
    ref = holder(x)
    summary = unconvert_model(copy.deepcopy(holder))
    assert summary.rows[0]["note"] == "was a Conv1D: lowrank='dense' gives one back"
    unconvert_model(holder, lowrank="dense")
    new = holder[0]
    assert type(new) is Conv1D and not new.bias.requires_grad and not new.bias.any()
    assert rel_err(holder(x), ref) < 1e-12


# -- DynamicRankCallback with a RankMonitor --------------------------------------------------------------


def _monitored_run(out_dir, resume=None, **arguments):
    from dynrank import RankMonitor
    from dynrank.hf import DynamicRankCallback
    model = _converted_gpt2()
    monitor = RankMonitor(model, name="gpt2")
    callback = DynamicRankCallback(1, 2, log=None, monitor=monitor)
    arguments = {"eval_strategy": "epoch", "eval_data": _Tokens(16), **arguments}
    trainer = _trainer(out_dir, callback, model=model, **arguments)
    trainer.train(resume_from_checkpoint=resume)
    return monitor, trainer, callback


def test_callback_runs_a_rank_monitor(tmp_path):
    monitor, trainer, callback = _monitored_run(tmp_path)
    assert monitor.epochs == [0, 1, 2, 3]
    assert [r["form"] for r in monitor.records] == ["lowrank", "full", "adapter", "adapter"]
    assert [(s["epoch"], s["kind"], s["source"]) for s in monitor.switches] == \
        [(1, "inflate", "scheduler"), (2, "deflate", "scheduler")]
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]      # one log per epoch (4 steps)
    assert monitor.scalar("loss") == ([0, 1, 2, 3], logged)
    evaluated = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert monitor.scalar("eval_loss") == ([0, 1, 2, 3], evaluated)
    assert all(r["wall_seconds"] > 0 and r["layers"] for r in monitor.records)
    assert set(callback.scheduler.forms()) <= set(monitor.records[1]["layers"])   # the dense head too
    from dynrank import RankMonitor
    saved = RankMonitor.load(str(tmp_path / "checkpoint-8" / "rank_monitor"))
    assert saved.epochs == [0, 1] and len(saved.switches) == 1


def test_callback_monitor_resumes_with_its_records(tmp_path):
    """Resumed from the checkpoint before the deflate (in the output folder, as resume_from_checkpoint=True
    finds it), the monitor reads back epochs 0 and 1 and their switch, records 2 and 3 itself, and sees
    no switch in what the checkpoint's load did."""
    import shutil
    full, _, _ = _monitored_run(tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "checkpoint-8", tmp_path / "again" / "checkpoint-8")
    resumed, _, _ = _monitored_run(tmp_path / "again", resume=True)
    assert resumed.epochs == full.epochs == [0, 1, 2, 3]
    assert [r["form"] for r in resumed.records] == [r["form"] for r in full.records]
    assert [(s["epoch"], s["kind"]) for s in resumed.switches] == [(1, "inflate"), (2, "deflate")]
    assert resumed.scalar("loss") == full.scalar("loss")


@pytest.mark.parametrize("step", [4, 6], ids=["epoch-boundary", "mid-epoch"])
def test_callback_monitor_resumes_from_step_checkpoints(tmp_path, step):
    """Step checkpoints (every 2 steps, a loss logged every step): the one at the end of epoch 0 holds that
    epoch (the Trainer saves it before on_epoch_end), and a resume in the middle of epoch 1 averages the
    epoch's losses from before the checkpoint too."""
    import shutil
    steps = dict(save="steps", save_steps=2, logging_steps=1, eval_strategy="no", eval_data=None)
    full, _, _ = _monitored_run(tmp_path / "full", **steps)
    shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", tmp_path / "again" / f"checkpoint-{step}")
    resumed, _, _ = _monitored_run(tmp_path / "again", resume=True, **steps)
    assert resumed.epochs == full.epochs == [0, 1, 2, 3]
    assert [r["form"] for r in resumed.records] == ["lowrank", "full", "adapter", "adapter"]
    assert resumed.scalar("loss") == full.scalar("loss")


def test_callback_monitor_of_another_model_is_refused():
    from types import SimpleNamespace

    from dynrank import RankMonitor
    from dynrank.hf import DynamicRankCallback
    with pytest.raises(TypeError, match="monitor must be a dynrank.RankMonitor or None, got dict"):
        DynamicRankCallback(1, 2, monitor={})
    model = _converted_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = DynamicRankCallback(1, 2, monitor=RankMonitor(_converted_gpt2()))
    state = SimpleNamespace(epoch=0, global_step=0)
    with pytest.raises(ValueError, match="monitor must be a RankMonitor of the Trainer's model"):
        callback.on_train_begin(SimpleNamespace(world_size=1, output_dir="unused"), state, None, model=model,
                                optimizer=optimizer)
    assert callback.scheduler is None


def test_callback_monitor_skips_another_runs_files_of_the_same_step(tmp_path):
    """Resumed from checkpoint-8 of one run into an output folder holding another run's checkpoint-8 (with
    its monitor's files), the monitor reads none of them: it warns and records from the resume on; told
    the folder by args.resume_from_checkpoint, it reads the checkpoint's own records back."""
    import json
    ours, _, _ = _monitored_run(tmp_path / "ours")
    _monitored_run(tmp_path / "other")
    owner = json.loads((tmp_path / "ours" / "checkpoint-8" / "rank_monitor.run.json").read_text())
    assert owner["global_step"] == 8 and owner["run"] != \
        json.loads((tmp_path / "other" / "checkpoint-8" / "rank_monitor.run.json").read_text())["run"]
    # The other run's files are there, at the same step, beside another run's model.
    with pytest.warns(UserWarning, match="monitor's records of the checkpoint loaded were not found"):
        resumed, _, _ = _monitored_run(tmp_path / "other", resume=str(tmp_path / "ours" / "checkpoint-8"))
    assert resumed.epochs == [2, 3]
    told, _, _ = _monitored_run(tmp_path / "other", resume=str(tmp_path / "ours" / "checkpoint-8"),
                                resume_from_checkpoint=str(tmp_path / "ours" / "checkpoint-8"))
    assert told.epochs == ours.epochs == [0, 1, 2, 3]
    assert told.scalar("loss") == ours.scalar("loss")


def test_callback_monitor_keeps_the_epochs_evaluations_from_an_evaluation_after_training(tmp_path):
    """trainer.evaluate() after train() (a test set) is no epoch's evaluation: the last epoch keeps its own."""
    monitor, trainer, _ = _monitored_run(tmp_path, epochs=3, save="no")
    evaluated = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert monitor.scalar("eval_loss") == ([0, 1, 2], evaluated)
    before = [dict(r["scalars"]) for r in monitor.records]
    test = trainer.evaluate(eval_dataset=_Tokens(8))
    assert test["eval_loss"] != evaluated[-1]
    assert [r["scalars"] for r in monitor.records] == before


def test_callback_monitor_tells_a_branch_from_its_run_and_resumes_a_resumed_run(tmp_path):
    """A run resumed from another's checkpoint writes its checkpoints under its own token: resumed from the
    branch's checkpoint-8 into the first run's folder (whose checkpoint-8 is the first run's), the monitor
    reads neither and warns; resumed from a checkpoint of the branch in its own folder, it reads the
    branch's records back, epoch 0 (before the branch) included."""
    import json
    import shutil
    first, _, _ = _monitored_run(tmp_path / "first")
    shutil.copytree(tmp_path / "first" / "checkpoint-4", tmp_path / "branch" / "checkpoint-4")
    branch, _, _ = _monitored_run(tmp_path / "branch", resume=True, max_grad_norm=0.05)
    assert branch.epochs == [0, 1, 2, 3] and branch.scalar("loss")[1][1] != first.scalar("loss")[1][1]
    owners = {}
    for run, step in (("first", 8), ("branch", 8), ("branch", 12)):
        folder = tmp_path / run / f"checkpoint-{step}"
        owners[run, step] = json.loads((folder / "rank_monitor.run.json").read_text())["run"]
        saved = json.loads((folder / "trainer_state.json").read_text())["stateful_callbacks"]["dynrank"]
        assert saved["run"] == owners[run, step]
    assert owners["branch", 8] == owners["branch", 12] != owners["first", 8]
    with pytest.warns(UserWarning, match="monitor's records of the checkpoint loaded were not found"):
        other, _, _ = _monitored_run(tmp_path / "first", resume=str(tmp_path / "branch" / "checkpoint-8"),
                                     max_grad_norm=0.05)
    assert other.epochs == [2, 3]
    again, _, _ = _monitored_run(tmp_path / "branch", resume=str(tmp_path / "branch" / "checkpoint-12"),
                                 max_grad_norm=0.05)
    assert again.epochs == [0, 1, 2, 3]
    assert again.scalar("loss") == branch.scalar("loss")
    assert again.scalar("eval_loss") == branch.scalar("eval_loss")


def test_callback_monitor_resumed_in_mid_epoch_keeps_what_the_epoch_logged_before(tmp_path):
    """4 steps an epoch, a loss logged every 3 steps, an evaluation every 5, a checkpoint every 6: resumed
    from checkpoint-6, in epoch 1 after its evaluation (step 5) and its one loss (step 6), the monitor has
    the uninterrupted run's numbers for every epoch, epoch 1's evaluation included."""
    import shutil
    steps = dict(save="steps", save_steps=6, logging_steps=3, eval_strategy="steps", eval_steps=5)
    full, _, _ = _monitored_run(tmp_path / "full", **steps)
    assert {"loss", "eval_loss"} <= set(full.records[1]["scalars"])
    shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / "again" / "checkpoint-6")
    resumed, _, _ = _monitored_run(tmp_path / "again", resume=True, **steps)
    assert resumed.epochs == full.epochs == [0, 1, 2, 3]
    assert resumed.scalar("loss") == full.scalar("loss")
    assert resumed.scalar("eval_loss") == full.scalar("eval_loss")
    assert resumed.records[1]["scalars"] == full.records[1]["scalars"]


@pytest.mark.parametrize("step", [1, 2, 4])
def test_callback_monitor_keeps_an_iterable_dataset_epoch_ended_at_a_step_checkpoint(tmp_path, step):
    """16 examples a pass, batch 8, max_steps=6: epochs end at steps 2, 4 and 6, each at on_epoch_end,
    after the Trainer saved the step's checkpoint.  The run's last step closes its epoch before that
    save; resumed from the checkpoint at the end of epoch 0 or 1, the monitor records that epoch as it
    stood at the save (the wall time rank_monitor.run.json keeps, not the moment of the resume), measured
    on the checkpoint's weights; resumed inside epoch 0 it goes on with it."""
    import json
    import shutil

    from dynrank import RankMonitor
    steps = dict(save="steps", save_steps=1, logging_steps=1, eval_strategy="no", eval_data=None,
                 data=_TokenStream(16), max_steps=6)
    full, _, _ = _monitored_run(tmp_path / "full", **steps)
    assert full.epochs == RankMonitor.load(str(tmp_path / "full" / "checkpoint-6" / "rank_monitor")).epochs == [0, 1, 2]
    shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", tmp_path / "again" / f"checkpoint-{step}")
    resumed, _, _ = _monitored_run(tmp_path / "again", resume=True, **steps)
    assert resumed.epochs == [0, 1, 2]
    assert [r["form"] for r in resumed.records] == ["lowrank", "full", "adapter"]
    assert [(s["epoch"], s["kind"]) for s in resumed.switches] == [(1, "inflate"), (2, "deflate")]
    assert resumed.scalar("loss") == full.scalar("loss")
    ended = resumed.records[step // 2 - 1] if step % 2 == 0 else None
    if ended is not None:
        opened = json.loads((tmp_path / "full" / f"checkpoint-{step}" / "rank_monitor.run.json").read_text())["open"]
        assert opened["epoch"] == ended["epoch"] and opened["wall_seconds"] > 0
        assert ended["wall_seconds"] == opened["wall_seconds"]
        assert ended["layers"] == full.records[step // 2 - 1]["layers"]


def test_callback_monitor_resumes_a_streamed_run_from_a_checkpoint_of_a_resumed_run(tmp_path):
    """16 examples a pass, batch 8, max_steps=8: a run resumed from checkpoint-4 (the end of epoch 1) saves
    state.epoch 1.25 at step 6, the end of epoch 2.  Resumed from there, the monitor keeps the deflate made
    at epoch 2 and ends with the uninterrupted run's epochs, forms, switches and losses, and the model with
    its weights."""
    import shutil
    steps = dict(save="steps", save_steps=1, logging_steps=1, eval_strategy="no", eval_data=None,
                 data=_TokenStream(16), max_steps=8)
    full, trainer, _ = _monitored_run(tmp_path / "full", **steps)
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    _monitored_run(tmp_path / "resumed", resume=True, **steps)
    shutil.copytree(tmp_path / "resumed" / "checkpoint-6", tmp_path / "again" / "checkpoint-6")
    resumed, again, _ = _monitored_run(tmp_path / "again", resume=True, **steps)
    assert resumed.epochs == full.epochs == [0, 1, 2, 3]
    assert [r["form"] for r in resumed.records] == ["lowrank", "full", "adapter", "adapter"]
    assert [(s["epoch"], s["kind"]) for s in resumed.switches] == [(1, "inflate"), (2, "deflate")]
    assert resumed.scalar("loss") == full.scalar("loss")
    state, expected = again.model.state_dict(), trainer.model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_callback_monitor_closes_the_last_epoch_cut_by_max_steps_before_the_final_save(tmp_path):
    """4 steps an epoch, max_steps=10: the run's last epoch ends at step 10, and checkpoint-10 holds it."""
    from dynrank import RankMonitor
    full, _, _ = _monitored_run(tmp_path, save="steps", save_steps=5, eval_strategy="no", eval_data=None,
                                max_steps=10)
    saved = RankMonitor.load(str(tmp_path / "checkpoint-10" / "rank_monitor"))
    assert saved.epochs == full.epochs == [0, 1, 2]
    assert saved.records[2]["layers"] == full.records[2]["layers"]


def _untimed(monitor):
    """A monitor's records without their times (the epoch's, the measurement's, the evaluations'), and its
    switches."""
    def scalars(record):
        return {k: v for k, v in record["scalars"].items() if not k.endswith(("_runtime", "_per_second"))}

    return ([dict({k: v for k, v in r.items() if k not in ("wall_seconds", "metrics_seconds")}, scalars=scalars(r))
             for r in monitor.records], monitor.switches)


@pytest.mark.parametrize("go_on", ["fresh-model", "same-trainer", "more-epochs"])
def test_callback_monitor_goes_on_after_a_run_stopped_by_max_steps_inside_an_epoch(tmp_path, go_on):
    """4 steps an epoch, a constant learning rate, a loss logged every 2 steps: a run stopped at step 10
    (max_steps=10, or num_train_epochs=2.5), inside epoch 2, closed that epoch at its last step, and
    checkpoint-10 holds it.  Continued to step 16 from there (into a fresh model with
    resume_from_checkpoint=True, on the same Trainer, or with num_train_epochs=4), the monitor goes on with
    epoch 2, timed from the resume on, and ends with the uninterrupted run's records (but for the times) and
    switches."""
    from dynrank import RankMonitor
    steps = dict(save="steps", save_steps=5, logging_steps=2, lr_scheduler_type="constant")
    full, _, _ = _monitored_run(tmp_path / "full", max_steps=16, **steps)
    assert full.epochs == [0, 1, 2, 3]
    stop, more = (dict(epochs=2.5), dict(epochs=4)) if go_on == "more-epochs" else \
        (dict(max_steps=10), dict(max_steps=16))
    cut, trainer, _ = _monitored_run(tmp_path / "again", **stop, **steps)
    assert trainer.state.global_step == 10 and cut.epochs == [0, 1, 2]
    assert RankMonitor.load(str(tmp_path / "again" / "checkpoint-10" / "rank_monitor")).epochs == [0, 1, 2]
    if go_on == "same-trainer":
        trainer.args.max_steps = 16
        trainer.train(resume_from_checkpoint=str(tmp_path / "again" / "checkpoint-10"))
        resumed = cut
    else:
        resumed, trainer, _ = _monitored_run(tmp_path / "again", resume=True, **more, **steps)
    assert trainer.state.global_step == 16
    assert _untimed(resumed) == _untimed(full)


def test_callback_monitor_by_steps_records_a_resumes_first_switch_in_its_epoch(tmp_path):
    """unit="step", 4 steps an epoch, the inflate at step 4 (the first of epoch 1): resumed from checkpoint-4
    copied out of the output folder, the monitor warns that the checkpoint's records were not found and
    records from the resume on, the inflate made at the resume's first step in epoch 1, as the uninterrupted
    run records it."""
    import shutil

    from dynrank import RankMonitor
    from dynrank.hf import DynamicRankCallback

    def run(out_dir, resume=None):
        model = _converted_gpt2()
        monitor = RankMonitor(model, name="gpt2")
        callback = DynamicRankCallback(4, 8, unit="step", log=None, monitor=monitor)
        _trainer(out_dir, callback, model=model, epochs=3, save="steps", save_steps=4).train(
            resume_from_checkpoint=resume)
        return monitor

    full = run(tmp_path / "full")
    assert [(s["epoch"], s["step"], s["kind"]) for s in full.switches] == [(1, 4, "inflate"), (2, 8, "deflate")]
    moved = shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "moved")
    with pytest.warns(UserWarning, match="monitor's records of the checkpoint loaded were not found"):
        resumed = run(tmp_path / "again", resume=str(moved))
    assert resumed.epochs == [1, 2]
    assert resumed.switches == full.switches
    assert [r["form"] for r in resumed.records] == [r["form"] for r in full.records[1:]] == ["full", "adapter"]


class _Interrupt(transformers.TrainerCallback):
    """A Ctrl-C once, at the end of optimizer step ``step`` (after the callbacks before it), or in the first
    batch of the first evaluation (``step=None``)."""

    def __init__(self, step=None):
        self.step, self.fired = step, False

    def _fire(self):
        self.fired = True
        raise KeyboardInterrupt

    def on_step_end(self, args, state, control, **kwargs):
        if not self.fired and state.global_step == self.step:
            self._fire()

    def on_prediction_step(self, args, state, control, **kwargs):
        if not self.fired and self.step is None:
            self._fire()


def test_callback_monitor_leaves_the_evaluation_at_the_start_of_a_resume_out(tmp_path):
    """eval_on_start evaluates before the resumed run's first step, on checkpoint-6's weights (inside epoch 1):
    no epoch's evaluation, so epoch 0 keeps its own numbers, as where the uninterrupted run made none."""
    import shutil
    steps = dict(epochs=3, save="steps", save_steps=6, logging_steps=1)
    full, _, _ = _monitored_run(tmp_path / "full", **steps)
    shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / "again" / "checkpoint-6")
    resumed, trainer, _ = _monitored_run(tmp_path / "again", resume=True, eval_on_start=True, **steps)
    assert len([h for h in trainer.state.log_history if "eval_loss" in h]) == 4    # 3 epochs' and the start's
    assert resumed.epochs == full.epochs == [0, 1, 2]
    assert resumed.scalar("eval_loss") == full.scalar("eval_loss")
    assert resumed.scalar("loss") == full.scalar("loss")


def _records(monitor):
    """A monitor's records and switches without what the clock and the layers' measurements give."""
    return ([(r["epoch"], r["form"], r["scalars"]) for r in monitor.records],
            [(s["epoch"], s["kind"], s["source"]) for s in monitor.switches])


@pytest.mark.parametrize("step, moved", [(3, False), (3, True), (6, True)],
                         ids=["epoch-0", "epoch-0-moved", "epoch-1-moved"])
def test_callback_monitor_goes_on_after_a_train_that_was_interrupted(tmp_path, step, moved):
    """Ctrl-C at step 7 (epoch 1, after the inflate), then train(resume_from_checkpoint=...) on the same
    Trainer from checkpoint-3 (inside epoch 0) or checkpoint-6 (inside epoch 1): the monitor, holding epoch 0
    and the inflate already, ends with the uninterrupted run's records.  It reads the checkpoint's back; where
    they are not found (the checkpoint moved out of the output folder), it keeps the epochs before the resumed
    one and the switches made before the checkpoint's step, with a warning."""
    import shutil
    full, _, _ = _monitored_run(tmp_path / "full", save="no", logging_steps=1, eval_strategy="no", epochs=3)
    from dynrank import RankMonitor
    from dynrank.hf import DynamicRankCallback
    model = _converted_gpt2()
    monitor = RankMonitor(model, name="gpt2")
    trainer = _trainer(tmp_path / "again", DynamicRankCallback(1, 2, log=None, monitor=monitor), model=model,
                       epochs=3, save="steps", save_steps=3, logging_steps=1)
    trainer.add_callback(_Interrupt(7))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert monitor.epochs == [0] and len(monitor.switches) == 1
    checkpoint = tmp_path / "again" / f"checkpoint-{step}"
    if moved:
        checkpoint = shutil.move(checkpoint, tmp_path / "moved")
        with pytest.warns(UserWarning, match="monitor's records of the checkpoint loaded were not found"):
            trainer.train(resume_from_checkpoint=str(checkpoint))
    else:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert _records(monitor) == _records(full)
    assert monitor.epochs == [0, 1, 2]


@pytest.mark.parametrize("restart", ["second-train", "auto-find-batch-size"])
def test_callback_monitor_starts_again_with_a_train_from_step_0(tmp_path, restart):
    """A second train() of the same Trainer, with nothing switched yet (inflate at epoch 5), and
    auto_find_batch_size starting the loop again after an out-of-memory error at step 5 (with batch 7: 5 steps
    an epoch): the monitor records the new run from its epoch 0, as a fresh one."""
    from dynrank import RankMonitor
    from dynrank.hf import DynamicRankCallback

    class OutOfMemory(transformers.TrainerCallback):
        fired = False

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5 and not self.fired:
                self.fired = True
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    model = _converted_gpt2()
    monitor = RankMonitor(model, name="gpt2")
    callback = DynamicRankCallback(5, 8, log=None, monitor=monitor)
    if restart == "second-train":
        trainer = _trainer(tmp_path, callback, model=model, epochs=2, save="no", logging_steps=1)
        trainer.train()
        assert monitor.epochs == [0, 1]
    else:
        trainer = _trainer(tmp_path, callback, model=model, epochs=2, save="no", logging_steps=1,
                           auto_find_batch_size=True)
        trainer.add_callback(OutOfMemory())
    trainer.train()
    assert trainer.state.global_step == trainer.state.max_steps == (8 if restart == "second-train" else 10)
    assert monitor.epochs == [0, 1] and monitor.switches == []
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = len(logged) // 2
    assert monitor.scalar("loss") == ([0, 1], [sum(logged[:steps]) / steps, sum(logged[steps:]) / steps])


@pytest.mark.parametrize("interrupt", [4, None], ids=["at-step-4", "in-its-evaluation"])
def test_callback_monitor_keeps_an_evaluation_after_an_interrupted_train_out(tmp_path, interrupt):
    """Ctrl-C at step 4 (the last of epoch 0, after the callback closed it), or in the evaluation after it:
    train() raised, and never called on_train_end; a test set's trainer.evaluate() after it is no epoch's."""
    from dynrank import RankMonitor
    from dynrank.hf import DynamicRankCallback
    model = _converted_gpt2()
    monitor = RankMonitor(model, name="gpt2")
    trainer = _trainer(tmp_path, DynamicRankCallback(1, 2, log=None, monitor=monitor), model=model, save="no",
                       eval_strategy="epoch", eval_data=_Tokens(16), logging_steps=1)
    trainer.add_callback(_Interrupt(interrupt))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    before = _records(monitor)
    assert monitor.epochs == [0] and "loss" in monitor.records[0]["scalars"]
    test = trainer.evaluate(eval_dataset=_Tokens(8))
    assert "eval_loss" in test and "eval_loss" not in monitor.records[0]["scalars"]
    assert _records(monitor) == before


def test_callback_resumes_a_streamed_run_past_a_switch_neither_run_reaches(tmp_path):
    """5 batches a pass, max_steps=7: epochs begin at steps 0 and 5.  Resumed from checkpoint-6, inside epoch
    1, the data start anew: epoch 2 begins at step 6 and epoch 3 at 11.  A deflate at epoch 3 comes in
    neither run, and the resume goes on; one at epoch 2 would come in the resumed run only: refused.  With
    max_steps=11 the resumed run's epoch 3 would begin at the run's end exactly: still neither run's."""
    from dynrank.hf import DynamicRankCallback

    def run(out_dir, deflate, resume=None, max_steps=7):
        switches = []
        trainer = _trainer(out_dir, DynamicRankCallback(1, deflate, log=switches.append), data=_TokenStream(40),
                           max_steps=max_steps, save="steps", save_steps=6)
        trainer.train(resume_from_checkpoint=resume)
        return switches, trainer.model

    full, reference = run(tmp_path / "full", 3)
    assert full == ["dynrank: epoch 1: 8 layers lowrank → full"]
    switches, resumed = run(tmp_path / "again", 3, resume=str(tmp_path / "full" / "checkpoint-6"))
    assert switches == [] and {m.form for m in resumed.modules() if isinstance(m, FusedLowRankLinear)} == {"full"}
    with pytest.raises(ValueError, match=r"inside epoch 1 \(begun at step 5\).*the switch at epoch 2"):
        run(tmp_path / "refused", 2, resume=str(tmp_path / "full" / "checkpoint-6"))
    full, _ = run(tmp_path / "full-11", 3, max_steps=11)
    assert full == ["dynrank: epoch 1: 8 layers lowrank → full"]
    switches, resumed = run(tmp_path / "again-11", 3, resume=str(tmp_path / "full-11" / "checkpoint-6"),
                            max_steps=11)
    assert switches == [] and {m.form for m in resumed.modules() if isinstance(m, FusedLowRankLinear)} == {"full"}


def test_callback_resumes_a_streamed_run_by_steps_from_inside_an_epoch(tmp_path):
    """By steps a switch does not depend on where the epochs begin: a streamed run (2 batches a pass) resumed
    from checkpoint-3, inside epoch 1, makes the deflate at step 4 where the uninterrupted run did."""
    from dynrank.hf import DynamicRankCallback

    def run(out_dir, resume=None):
        switches, trainer = [], None
        callback = DynamicRankCallback(
            2, 4, unit="step", log=lambda line: switches.append((trainer.state.global_step, line)))
        trainer = _trainer(out_dir, callback, data=_TokenStream(16), max_steps=6, save="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=resume)
        return switches, trainer.model

    full, _ = run(tmp_path / "full")
    assert full == [(2, "dynrank: step 2: 8 layers lowrank → full"),
                    (4, "dynrank: step 4: 8 layers full → adapter")]
    switches, resumed = run(tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-3"))
    assert switches == full[1:]
    assert {m.form for m in resumed.modules() if isinstance(m, FusedLowRankLinear)} == {"adapter"}


# -- IncrementalRankCallback: InRank's growth inside transformers.Trainer ------------------------------------


def _growth_callback(**settings):
    from dynrank.hf_inrank import IncrementalRankCallback
    return IncrementalRankCallback(**{"init_rank": 1, "buffer": 2, "threshold": 0.99, "warmup_steps": 0,
                                      "check_every": 1, "log": None, **settings})


def test_inrank_callback_grows_the_ranks_and_resumes_bitwise(tmp_path):
    """Growth at every step of the uninterrupted run (8 steps, 4 an epoch, a checkpoint every 2).  Resumed from
    checkpoint-2 and checkpoint-6 (inside epoch 1), the run keeps the grown ranks the Trainer loaded, grows
    where the uninterrupted run grew, and ends with its weights and scheduler state, bit for bit."""
    lines = []
    callback = _growth_callback(log=lines.append)
    reference, trainer = _train(tmp_path / "full", callback, epochs=2, save="steps", save_steps=2)
    grown_at = sorted({step for step, _, _, _ in callback.changes})
    assert grown_at[0] == 1 and grown_at[-1] >= 7
    assert lines[0] == "dynrank: step 1: 8 layers grew, rank 3 → 4"
    assert callback.scheduler.optimizer is trainer.optimizer
    expected = reference.state_dict()
    for step in (2, 6):
        resumed_callback = _growth_callback()
        checkpoint = tmp_path / "full" / f"checkpoint-{step}"
        resumed, _ = _train(tmp_path / f"from-{step}", resumed_callback, resume=str(checkpoint), epochs=2, save="no")
        assert resumed_callback.changes == [change for change in callback.changes if change[0] > step]
        assert resumed_callback.scheduler.state_dict() == callback.scheduler.state_dict()
        state = resumed.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), f"resumed from checkpoint-{step}"


def test_inrank_callback_resumes_the_discovered_ranks_of_layers_capped_by_max_rank(tmp_path):
    """With max_rank below init_rank + buffer every layer sits at max_rank, and its discovered rank is not its rank
    − buffer: the resume takes the saved discovered ranks, and ends with the uninterrupted run's weights and
    scheduler state, bit for bit."""
    settings = dict(init_rank=2, buffer=4, threshold=0.999, max_rank=4)
    callback = _growth_callback(**settings)
    reference, _ = _train(tmp_path / "full", callback, epochs=1, save="steps", save_steps=2)
    assert set(callback.scheduler.ranks.values()) == {4} and callback.changes == []
    assert min(callback.scheduler.current.values()) > 1           # a resume that took rank − buffer would find 1
    resumed_callback = _growth_callback(**settings)
    resumed, _ = _train(tmp_path / "resumed", resumed_callback, resume=str(tmp_path / "full" / "checkpoint-2"),
                        epochs=1, save="no")
    assert resumed_callback.scheduler.state_dict() == callback.scheduler.state_dict()
    expected, state = reference.state_dict(), resumed.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_inrank_callback_refuses_a_checkpoint_state_of_other_ranks(tmp_path):
    """A checkpoint whose saved ranks are not those of the layers the Trainer loaded is refused; one without
    the callback's state starts InRank at the resume, with a warning."""
    import json
    _train(tmp_path / "full", _growth_callback(), epochs=1, save="steps", save_steps=2)
    folder = tmp_path / "full" / "checkpoint-2"
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    saved = trainer_state["stateful_callbacks"]["dynrank_inrank"]
    name = next(iter(saved["ranks"]))
    saved["ranks"][name] += 1
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
    with pytest.raises(ValueError, match=r"resuming at global step 2: the InRank state in the checkpoint's "
                                         r"trainer_state.json .* does not fit this model: it has the layers at ranks"):
        _train(tmp_path / "refused", _growth_callback(), resume=str(folder), epochs=1, save="no")
    del trainer_state["stateful_callbacks"]["dynrank_inrank"]
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
    fresh = _growth_callback(init_rank=2)
    with pytest.warns(UserWarning, match="resuming at global step 2 from a checkpoint without its state"):
        _train(tmp_path / "fresh", fresh, resume=str(folder), epochs=1, save="no")
    assert fresh.scheduler.last_step == 4 and min(fresh.scheduler.ranks.values()) >= 4


@pytest.mark.parametrize("growth_first", [False, True], ids=["dynamic-first", "growth-first"])
def test_inrank_callback_beside_a_dynamic_rank_callback_is_refused_when_training_begins(tmp_path, growth_first):
    """Both callbacks were accepted: with a warmup of 100 steps the two schedulers resized the same layers for the
    whole run without a word (with none, the run stopped at the first check after the inflate, an epoch
    trained).  The scheduler built second refuses the layers the first manages, at on_train_begin, in either
    order."""
    from dynrank.hf import DynamicRankCallback
    callbacks = [DynamicRankCallback(1, 2, log=None), _growth_callback(warmup_steps=100)]
    if growth_first:
        callbacks.reverse()
    trainer = _trainer(tmp_path, callbacks[0], epochs=3, save="no")
    trainer.add_callback(callbacks[1])
    first, other = ("DynamicRankScheduler", "IncrementalRankScheduler")[::-1 if growth_first else 1]
    with pytest.raises(ValueError, match=rf"^layers 'transformer\.h\.0\.attn\.c_attn', .* and 3 more are managed "
                                         rf"by a live {first}: a DynamicRankScheduler and an IncrementalRankScheduler "
                                         rf"are not meant to drive one model .*build the {other} over other layers"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_inrank_callback_refuses_a_resume_above_its_max_rank(tmp_path):
    """Resumed with max_rank below the checkpoint's ranks, the layers kept their ranks and the scheduler's state
    said max_rank 4 with layers at 5, in every later checkpoint too.  Refused, naming the layer, its rank and the
    cap; a cap at the checkpoint's ranks resumes."""
    import json
    _train(tmp_path / "full", _growth_callback(), epochs=1, save="steps", save_steps=2)
    folder = tmp_path / "full" / "checkpoint-2"
    saved = json.loads((folder / "trainer_state.json").read_text())["stateful_callbacks"]["dynrank_inrank"]
    name, top = next(iter(saved["ranks"].items()))
    assert set(saved["ranks"].values()) == {top} and top > 3
    with pytest.raises(ValueError, match=rf"^resuming at global step 2: layer {re.escape(repr(name))} has rank {top} "
                                         rf"in the checkpoint, above the max_rank={top - 1} given to "
                                         rf"IncrementalRankCallback \(8 layers above it\).*resume with "
                                         rf"max_rank={top} or more, or None"):
        _train(tmp_path / "refused", _growth_callback(max_rank=top - 1), resume=str(folder), epochs=1, save="no")
    capped = _growth_callback(max_rank=top)
    _train(tmp_path / "capped", capped, resume=str(folder), epochs=1, save="no")
    assert set(capped.scheduler.ranks.values()) == set(capped.scheduler.max_rank.values()) == {top}


def _per_step(changes):
    return {step: sum(1 for change in changes if change[0] == step) for step in sorted({c[0] for c in changes})}


def test_inrank_callback_changes_follow_a_resume_on_the_same_trainer_and_a_second_train(tmp_path):
    """Ctrl-C at step 7, then train(resume_from_checkpoint=checkpoint-4) on the same Trainer: the weights were
    the uninterrupted run's, but callback.changes kept the growth at steps 5-7 that the resume undid, and listed
    the resumed run's there again.  It is the uninterrupted run's now; a train() from step 0 starts it afresh."""
    full = _growth_callback()
    _train(tmp_path / "full", full, epochs=2, save="no")
    lines = []
    growth = _growth_callback(log=lines.append)
    trainer = _trainer(tmp_path / "again", growth, epochs=2, save="steps", save_steps=2)
    trainer.add_callback(_Interrupt(7))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert max(step for step, *_ in growth.changes) == 7
    trainer.train(resume_from_checkpoint=str(tmp_path / "again" / "checkpoint-4"))
    assert growth.changes == full.changes
    lines.clear()
    trainer.train()
    logged = {int(line.split()[2][:-1]): int(line.split()[3]) for line in lines}   # "dynrank: step 1: 8 layers"
    assert _per_step(growth.changes) == logged and min(logged) == 1


@pytest.mark.parametrize("unit, checkpoint", [("epoch", 4), ("epoch", 6), ("step", 4), ("step", 6)])
def test_callback_changes_follow_a_resume_on_the_same_trainer(tmp_path, unit, checkpoint):
    """Ctrl-C at step 7, after the inflate (at epoch 1, or before step 6), then a resume on the same Trainer from
    checkpoint-4 (before the inflate) or checkpoint-6 (after it): callback.changes listed the inflate twice where
    the resume made it again.  It is the uninterrupted run's now."""
    from dynrank.hf import DynamicRankCallback
    schedule = (1, 2) if unit == "epoch" else (5, 9)
    full = DynamicRankCallback(*schedule, unit=unit, log=None)
    _train(tmp_path / "full", full, epochs=3, save="no")
    assert [count for count, *_ in full.changes] == [schedule[0]] * 8 + [schedule[1]] * 8
    callback = DynamicRankCallback(*schedule, unit=unit, log=None)
    trainer = _trainer(tmp_path / "again", callback, epochs=3, save="steps", save_steps=2)
    trainer.add_callback(_Interrupt(7))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert callback.changes == full.changes[:8]
    trainer.train(resume_from_checkpoint=str(tmp_path / "again" / f"checkpoint-{checkpoint}"))
    assert callback.changes == full.changes


def test_callback_refuses_a_resume_of_another_alpha_or_other_layer_sizes(tmp_path):
    """The resume loaded the checkpoint's forms and ranks into the scheduler's own state, so the alphas and
    weight shapes the checkpoint records were never compared: a run converted with alpha=16 resumed into a
    model converted without, which computes another function with the loaded factors.  Refused as
    load_training_state refuses it; with the same alpha it resumes."""
    import json
    from dynrank.hf import DynamicRankCallback
    _train(tmp_path / "full", DynamicRankCallback(1, 2, log=None), model=_converted_gpt2(alpha=16.0), epochs=2)
    folder = tmp_path / "full" / "checkpoint-4"
    prefix = r"^resuming at global step 4: the schedule's state in the checkpoint's trainer_state\.json " \
             r"\(stateful_callbacks\['dynrank'\]\) does not fit this model: "
    with pytest.raises(ValueError, match=prefix + r"layer 'transformer\.h\.0\.attn\.c_attn' has alpha None but the "
                                                  r"checkpoint has 16\.0"):
        _train(tmp_path / "refused", DynamicRankCallback(1, 2, log=None), resume=str(folder), epochs=2, save="no")
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    shapes = trainer_state["stateful_callbacks"]["dynrank"]["scheduler"]["shapes"]
    shapes["transformer.h.0.attn.c_attn"] = [96, 16]
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
    with pytest.raises(ValueError, match=prefix + r"layer 'transformer\.h\.0\.attn\.c_attn' has a weight of shape "
                                                  r"\(96, 32\) but the checkpoint's is \(96, 16\)"):
        _train(tmp_path / "resized", DynamicRankCallback(1, 2, log=None), resume=str(folder),
               model=_converted_gpt2(alpha=16.0), epochs=2, save="no")
    shapes["transformer.h.0.attn.c_attn"] = [96, 32]
    # The rank each layer last had in lowrank form comes back with the rest (the cost of the lowrank epochs
    # reads it): a saved run whose first layer had rank 3 there.
    lowrank_ranks = trainer_state["stateful_callbacks"]["dynrank"]["scheduler"]["lowrank_ranks"]
    assert lowrank_ranks["transformer.h.0.attn.c_attn"] == 16
    lowrank_ranks["transformer.h.0.attn.c_attn"] = 3
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
    model = _converted_gpt2(alpha=16.0)
    _train(tmp_path / "same", DynamicRankCallback(1, 2, log=None), resume=str(folder), model=model,
           epochs=2, save="no")
    assert model.get_submodule("transformer.h.0.attn.c_attn")._lowrank_rank == 3
    assert model.get_submodule("transformer.h.0.attn.c_proj")._lowrank_rank == 16


def test_inrank_callback_refuses_a_resume_of_another_alpha(tmp_path):
    """The InRank state kept no alpha: a run converted with alpha=16 resumed into a model converted without."""
    _train(tmp_path / "full", _growth_callback(), model=_converted_gpt2(alpha=16.0), epochs=1, save="steps",
           save_steps=2)
    folder = tmp_path / "full" / "checkpoint-2"
    with pytest.raises(ValueError, match=r"^resuming at global step 2: the InRank state in the checkpoint's "
                                         r"trainer_state\.json .* does not fit this model: layer "
                                         r"'transformer\.h\.0\.attn\.c_attn' has alpha None but the checkpoint "
                                         r"has 16\.0"):
        _train(tmp_path / "refused", _growth_callback(), resume=str(folder), epochs=1, save="no")
    resumed = _growth_callback()
    _train(tmp_path / "same", resumed, resume=str(folder), model=_converted_gpt2(alpha=16.0), epochs=1, save="no")
    assert resumed.scheduler.state_dict()["alphas"] == dict.fromkeys(resumed.scheduler.ranks, 16.0)


def test_inrank_callback_refuses_a_resume_into_a_model_of_another_form(tmp_path):
    """A lowrank run's checkpoint resumed into a model converted in adapter form: the Trainer's non-strict load
    left each layer's frozen W beside the saved factors, and training went on computing W + A·Bᵀ where the saved
    run computed A·Bᵀ.  Refused, naming the layer and both forms, as is that checkpoint's state saved without
    forms only where it lacks them (no check then); an adapter run's checkpoint, which the Trainer's load
    switches a lowrank layer to, resumes bit for bit."""
    import json
    _train(tmp_path / "lowrank", _growth_callback(), epochs=1, save="steps", save_steps=2)
    folder = tmp_path / "lowrank" / "checkpoint-2"
    with pytest.raises(ValueError, match=r"^resuming at global step 2: the InRank state in the checkpoint's "
                                         r"trainer_state\.json .* does not fit this model: layer "
                                         r"'transformer\.h\.0\.attn\.c_attn' is in adapter form but the checkpoint "
                                         r"has it in lowrank form: .*form='lowrank'"):
        _train(tmp_path / "refused", _growth_callback(), resume=str(folder), model=_converted_gpt2(form="adapter"),
               epochs=1, save="no")
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    del trainer_state["stateful_callbacks"]["dynrank_inrank"]["forms"]              # a state saved without them
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
    unchecked = _growth_callback()
    _train(tmp_path / "unchecked", unchecked, resume=str(folder), model=_converted_gpt2(form="adapter"), epochs=1,
           save="no")
    assert unchecked.scheduler.state_dict()["forms"] == dict.fromkeys(unchecked.scheduler.ranks, "adapter")
    reference, _ = _train(tmp_path / "adapter", _growth_callback(), model=_converted_gpt2(form="adapter"), epochs=1,
                          save="steps", save_steps=2)
    resumed, _ = _train(tmp_path / "switched", _growth_callback(), resume=str(tmp_path / "adapter" / "checkpoint-2"),
                        epochs=1, save="no")
    expected, state = reference.state_dict(), resumed.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_inrank_callback_warning_of_a_resume_without_its_state_says_what_init_rank_none_keeps(tmp_path):
    """With init_rank=None the warning said each layer was cut to init_rank + buffer components, where the layers
    keep the ranks the Trainer loaded (cut to max_rank where above it)."""
    import json
    _train(tmp_path / "full", _growth_callback(), epochs=1, save="steps", save_steps=2)
    folder = tmp_path / "full" / "checkpoint-2"
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    saved = trainer_state["stateful_callbacks"].pop("dynrank_inrank")
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state))
    top = max(saved["ranks"].values())
    prefix = (r"^IncrementalRankCallback: resuming at global step 2 from a checkpoint without its state "
              r"\(stateful_callbacks\['dynrank_inrank'\] of trainer_state\.json\): InRank starts here, ")
    for max_rank, kept in ((None, ""), (top - 1, rf" \(cut to max_rank={top - 1} where above it\)")):
        kept_ranks = _growth_callback(init_rank=None, max_rank=max_rank, warmup_steps=100)
        with pytest.warns(UserWarning, match=prefix + rf"each layer keeps the rank it loaded{kept}, its discovered "
                                                      rf"rank at that rank − buffer$"):
            _train(tmp_path / f"kept-{max_rank}", kept_ranks, resume=str(folder), epochs=1, save="no")
        assert kept_ranks.scheduler.ranks == {name: min(rank, max_rank or rank)
                                              for name, rank in saved["ranks"].items()}
    with pytest.warns(UserWarning, match=prefix + r"each layer cut to init_rank \+ buffer components$"):
        _train(tmp_path / "cut", _growth_callback(init_rank=1, warmup_steps=100), resume=str(folder), epochs=1,
               save="no")


def test_inrank_callback_checks_its_settings_at_construction():
    from dynrank.hf_inrank import IncrementalRankCallback
    with pytest.raises(TypeError, match="unexpected keyword argument.*inflate_epoch"):
        IncrementalRankCallback(inflate_epoch=1)
    with pytest.raises(ValueError, match="threshold"):
        IncrementalRankCallback(threshold=1.5)
    with pytest.raises(TypeError, match="init_rank must be a positive int or None"):
        IncrementalRankCallback(init_rank=2.0)
    with pytest.raises(TypeError, match="log must be callable"):
        IncrementalRankCallback(log="print")


@pytest.mark.parametrize("tp,exact", [(1, False), (2, False), (2, True)], ids=["usual", "tp-usual", "tp-emulation"])
def test_bloom_keeps_the_layers_it_slices_dense_only_where_it_slices_them(tp, exact):
    """Bloom slices ``dense.weight`` and ``dense_4h_to_h.weight`` only with pretraining_tp > 1 and
    slow_but_exact; its usual path (pretraining_tp > 1 without slow_but_exact too) calls the layers, which the
    code search alone kept dense.  Converted in float64 at full rank (random biases, so a bias left out shows
    too), the model computes what it did."""
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                      pretraining_tp=tp, slow_but_exact=exact)
    model = transformers.BloomModel(config).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.bias.normal_(0, 0.1)
        ref = model(tokens()).last_hidden_state
    summary = convert_model(model, rank_ratio=1.0)
    sliced = {"h.0.self_attention.dense": "BloomAttention uses dense.weight itself (would skip the factors)",
              "h.0.mlp.dense_4h_to_h": "BloomMLP uses dense_4h_to_h.weight itself (would skip the factors)"}
    skipped = dict(summary.skipped)
    if exact:
        assert {name: skipped.get(name) for name in sliced} == sliced
        assert all(type(model.get_submodule(name)) is nn.Linear for name in sliced)
    else:
        assert set(sliced) <= set(summary.converted) and "h.0.self_attention.query_key_value" in summary.converted
    assert "h.0.mlp.dense_h_to_4h" in summary.converted
    assert all(type(model.get_submodule(name)) is FusedLowRankLinear for name in summary.converted)
    with torch.no_grad():
        assert rel_err(model(tokens()).last_hidden_state, ref) < 1e-10
