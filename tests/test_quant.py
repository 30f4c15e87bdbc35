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
    QuantLinear,
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


def test_the_few_row_kernel_rounds_and_the_many_row_path_keeps_the_full_weights():
    torch.manual_seed(0)
    lin = nn.Linear(128, 208)
    with pytest.raises(ValueError, match="int4 needs inputs a multiple of 64 and outputs of 16"):
        Int4Linear(nn.Linear(128, 200))
    x = torch.randn(ROWS_FOR_MATMUL + 1, 128)
    want = lin(x).detach()
    for kind, bound in ((Int8Linear, 0.02), (Int4Linear, 0.1)):
        q = kind(lin)
        few = torch.cat([q(x[i : i + 1]) for i in range(len(x))]).float()  # the kernel, a row at a time
        many = q(x).float()  # the bf16 copy of the full weights
        assert float((many - want).abs().max() / want.abs().max()) < 0.01  # bf16 rounding only
        err = float((few - want).abs().max() / want.abs().max())
        assert 0.005 < err < bound, (kind, err)  # quantized: close, but not the same weights
        assert torch.allclose(
            few,
            x.to(torch.bfloat16).float() @ q.dequantized().float().t() + q.bias.float(),
            rtol=0.02,
            atol=0.02,
        )
        assert "dense" not in q.state_dict()
        QuantLinear.force_kernel = True
        try:
            torch.testing.assert_close(q(x).float(), few, rtol=0.02, atol=0.02)  # the bench's quality path
        finally:
            QuantLinear.force_kernel = False


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
