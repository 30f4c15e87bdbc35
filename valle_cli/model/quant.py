"""Weight-only int8 linears for decoding on a CPU (`valle synth --dtype int8`).

A cached AR step multiplies one token by every weight matrix of the model: it is bound by how fast the
weights stream from memory, so weights of 1 byte instead of 4 (fp32) or 2 (bf16) make it faster. Each output
row of a matrix gets its own scale (absmax / 127, symmetric, no zero point); activations stay in bf16 and
every product accumulates in fp32 (torch's `_weight_int8pack_mm` on a CPU). Work with many rows at once
(the NAR passes, a prefill) is compute-bound instead, and there the int8 kernel is slower than a bf16
matmul: rows above `ROWS_FOR_MATMUL` take the weights dequantized to bf16 (measured: docs/benchmarks.md).

Only plain `nn.Linear` layers are replaced (transformers' and ours, the level heads, the text head); bitnet's
`BitLinear` is already ternary and stays. Quality against fp32 is measured on a trained model's held-out
loss (docs/benchmarks.md, "Lighter weights").
"""

from __future__ import annotations

import torch
from torch import nn

ROWS_FOR_MATMUL = 16  # more rows than this: dequantize and use a dense bf16 matmul


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights (per-output-row scales) and bf16 activations."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(1).clamp_min(1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(dtype))
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias)

    def dequantized(self) -> torch.Tensor:
        """(out, in) weights in the activation dtype."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scales.dtype)
        if x2.device.type == "cpu" and x2.shape[0] <= ROWS_FOR_MATMUL:
            out = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales)
        else:
            out = x2 @ self.dequantized().t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cast `model` to `dtype` and replace every plain `nn.Linear` in it by an `Int8Linear`, in place.
    Returns how many layers were replaced."""
    model.to(dtype)
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in swaps:
        setattr(parent, name, Int8Linear(child, dtype))
    return len(swaps)


def set_dtype(model: nn.Module, dtype: str) -> None:
    """What `valle synth --dtype` does: fp32 (nothing), fp16 or bf16 (a cast), or int8 (`quantize_int8`)."""
    from valle_cli.infer.load import DTYPES

    if dtype == "int8":
        quantize_int8(model)
    elif dtype != "fp32":
        model.to(DTYPES[dtype])
