"""Weight-only int8 linears (`valle synth --dtype int8`): the same function as the layer they replace within
int8 rounding, on both the small-batch kernel and the dequantized matmul; every plain linear of a model is
replaced and the model still decodes, close to fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from valle_cli.config import load_config
from valle_cli.infer.engine import SamplingConfig, generate
from valle_cli.model.quant import ROWS_FOR_MATMUL, Int8Linear, quantize_int8
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
