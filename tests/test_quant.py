"""Weight-only int8 linears (`valle synth --dtype int8`): the same function as the layer they replace within
int8 rounding, on both the small-batch kernel and the dequantized matmul; every plain linear of a model is
replaced and the model still decodes, close to fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from valle_cli.config import load_config
from valle_cli.infer.engine import SamplingConfig, generate
from valle_cli.model.quant import (
    ROWS_FOR_MATMUL,
    Int4Linear,
    Int8Linear,
    int4_fits,
    quantize,
    quantize_int8,
)
from valle_cli.model.valle import VALLE, Sample


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, ROWS_FOR_MATMUL + 1, 300])
def test_an_int8_linear_computes_the_layer_within_rounding(bias, rows):
    torch.manual_seed(0)
    lin = nn.Linear(96, 1025, bias=bias)  # an odd output size, as the level-0 head's
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (1025,)
    x = torch.randn(2, rows, 96)
    want = lin(x).detach()
    got = q(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 0.02, err
    assert float(err) > 0  # it is rounded: not the same layer by accident


def test_quantizing_a_model_replaces_every_plain_linear_and_keeps_its_predictions():
    torch.manual_seed(0)
    cfg = load_config("tiny").model
    ref = VALLE(cfg, n_symbols=623).eval()
    model = VALLE(cfg, n_symbols=623).eval()
    model.load_state_dict(ref.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert quantize_int8(model) == n_linear > 10
    assert not any(type(m) is nn.Linear for m in model.modules())
    g = torch.Generator().manual_seed(1)
    s = Sample(torch.tensor([1, 10, 20, 30, 2]), torch.randint(0, 1024, (8, 30), generator=g),
               torch.randint(0, 1024, (8, 20), generator=g), 3)  # fmt: skip
    with torch.no_grad():
        a = ref([s], return_hidden=True).hidden
        b = model([s], return_hidden=True).hidden.float()
    assert float((a - b).abs().max() / a.abs().max()) < 0.05
    ph, prompt = s.phonemes, s.prompt
    with torch.no_grad():
        model.heads[0].bias[model.stop_id] = -1e4
    out = generate(model, ph, prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=10))
    assert out.codes.shape == (8, 10)


def test_bitnet_keeps_its_ternary_linears():
    from valle_cli.backbones.transformer import BitLinear

    torch.manual_seed(0)
    model = VALLE(load_config("tiny", ["model.backbone=bitnet"]).model, n_symbols=623).eval()
    bits = sum(isinstance(m, BitLinear) for m in model.modules())
    quantize_int8(model)
    assert bits and sum(isinstance(m, BitLinear) for m in model.modules()) == bits
    out = generate(model, torch.tensor([1, 5, 2]), torch.randint(0, 1024, (8, 10)),
                   sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=4))  # fmt: skip
    assert out.codes.shape[0] == 8


def test_both_paths_compute_the_same_rounded_weights_and_int4s_layout_is_what_we_think():
    torch.manual_seed(0)
    lin = nn.Linear(128, 208)
    with pytest.raises(ValueError, match="int4 needs inputs a multiple of 64 and outputs of 16"):
        Int4Linear(nn.Linear(128, 200))
    x = torch.randn(ROWS_FOR_MATMUL + 1, 128)
    want = lin(x).detach()
    w = lin.weight.detach()
    # int4 rounded independently of the layer: groups of 64 inputs, 16 steps from their min to their max
    g = w.reshape(208, 2, 64)
    low, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    int4_w = (((g - low) / step).round() * step + low).reshape(208, 128)
    int8_scale = w.abs().amax(1, keepdim=True) / 127
    int8_w = (w / int8_scale).round() * int8_scale
    for kind, rounded, bound in ((Int8Linear, int8_w, 0.02), (Int4Linear, int4_w, 0.1)):
        q = kind(lin)
        few = torch.cat([q(x[i : i + 1]) for i in range(len(x))]).float()  # the kernel, a row at a time
        many = q(x).float()  # the dense copy
        ref = x @ rounded.t() + lin.bias.detach()
        for got in (few, many):
            assert float((got - ref).abs().max() / ref.abs().max()) < 0.01  # the same rounded weights
        err = float((few - want).abs().max() / want.abs().max())
        assert 0.002 < err < bound, (kind, err)  # rounded: close to the layer, but not the layer
        assert "dense" not in q.state_dict()
        q.force_kernel = True  # per layer: the bench's quality path
        torch.testing.assert_close(q(x).float(), few, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="load the full model, then quantize"):
            q.load_state_dict(q.state_dict())


def test_a_batched_decoding_step_gives_each_row_what_it_gets_alone():
    torch.manual_seed(0)
    for kind in (Int8Linear, Int4Linear):
        q = kind(nn.Linear(384, 1536))
        x = torch.randn(ROWS_FOR_MATMUL, 384)
        alone = torch.cat([q(x[i : i + 1]) for i in range(len(x))])
        assert torch.equal(q(x), alone)  # up to ROWS_FOR_MATMUL rows: the kernel, exact per row


def test_mamba_keeps_the_linears_it_reads_the_weights_of():
    torch.manual_seed(0)
    model = VALLE(load_config("tiny", ["model.backbone=mamba"]).model, n_symbols=623).eval()
    quantize(model, 4)
    kept = [n for n, m in model.named_modules() if n.endswith("dt_proj")]
    assert kept and all(type(model.get_submodule(n)) is nn.Linear for n in kept)
    with torch.no_grad():
        model.heads[0].bias[model.stop_id] = -1e4
    g = torch.Generator().manual_seed(1)
    out = generate(model, torch.tensor([1, 10, 20, 2]), torch.randint(0, 1024, (8, 20), generator=g),
                   sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=5))  # fmt: skip
    assert out.codes.shape == (8, 5)


def test_int4_takes_the_layers_its_kernel_fits_and_int8_the_rest():
    torch.manual_seed(0)
    model = VALLE(load_config("tiny").model, n_symbols=623).eval()
    fits = [m for m in model.modules() if type(m) is nn.Linear and int4_fits(m)]
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert 0 < len(fits) < n_linear  # the level-0 head (1025 outputs) does not fit
    assert quantize(model, 4) == n_linear
    assert sum(type(m) is Int4Linear for m in model.modules()) == len(fits)
    assert sum(type(m) is Int8Linear for m in model.modules()) == n_linear - len(fits)
    with torch.no_grad():
        model.heads[0].bias[model.stop_id] = -1e4
    g = torch.Generator().manual_seed(1)
    ph, prompt = torch.tensor([1, 10, 20, 30, 2]), torch.randint(0, 1024, (8, 30), generator=g)
    out = generate(model, ph, prompt, sampling=SamplingConfig(ar_temp=0.0, max_ar_steps=10))
    assert out.codes.shape == (8, 10)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize(model, 2)


def test_quantized_dtypes_are_refused_off_the_cpu_and_unknown_ones_name_the_choices():
    from valle_cli.errors import ValleError
    from valle_cli.model.quant import set_dtype

    model = VALLE(load_config("tiny").model, n_symbols=623).to("meta")  # stands for any non-CPU device
    with pytest.raises(ValleError, match="for decoding on a CPU") as e:
        set_dtype(model, "int4")
    assert "bf16" in e.value.remedy
    with pytest.raises(ValleError, match="unknown --dtype 'int3'") as e:
        set_dtype(model, "int3")
    assert "int8 or int4" in e.value.remedy


def test_a_model_without_ar_steps_is_told_int8_and_int4_gain_nothing():
    from valle_cli.model.quant import dtype_note

    ar = VALLE(load_config("tiny").model, n_symbols=623)
    nar0 = VALLE(load_config("tiny", ["model.alignment=pointer", "model.level0=nar"]).model, n_symbols=623)
    assert nar0.nar0 and not ar.nar0
    assert "--dtype bf16 is as fast" in dtype_note(nar0, "int4")
    assert dtype_note(nar0, "bf16") is None and dtype_note(ar, "int8") is None
