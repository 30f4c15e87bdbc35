"""Weight-only int8 and int4 linears for decoding on a CPU (`valle synth --dtype int8|int4`).

A cached AR step multiplies one token by every weight matrix of the model: it is bound by how fast the
weights stream from memory, so weights of 1 byte (int8) or half a byte (int4) instead of 4 (fp32) or 2 (bf16)
make it faster. int8: each output row of a matrix gets its own scale (absmax / 127, symmetric, no zero point),
torch's `_weight_int8pack_mm`. int4: each group of `INT4_GROUP` inputs of a row gets a scale and a zero point
(min to max in 16 steps), torch's `_weight_int4pack_mm_for_cpu`; a layer whose shape that kernel cannot take
(inputs not a multiple of the group, outputs not of 16: the level-0 head with its STOP row) stays int8.
Activations stay bf16 and every product accumulates in fp32.

Work with many rows at once (the NAR passes, a prefill) is compute-bound instead, and there the quantized
kernels, whose time grows with the rows, lose to a dense bf16 matmul (from 8 rows on): rows above
`ROWS_FOR_MATMUL` use a bf16 copy of the quantized weights (`dense`, made once when the layer is built:
dequantizing per call cost 10x the matmul itself, 4 ms against 0.4 ms for a 1024x4096 matrix). Both paths
compute with the same rounded weights. The threshold is 16, not the crossover, so that a batched decoding step
(up to 16 rows) takes the kernel exactly as one row does: the kernel gives a row the same result whatever the
batch, where the bf16 matmul's blocking (and so its rounding) changes with the rows (it still does for a
batch's prefill and NAR passes, so a batched request matches its lone run within bf16 rounding). An int8 model holds 3
bytes per weight (1 + 2), int4 2.5, against fp32's 4 and bf16's 2, while a decoding step reads 1 or 0.5.
Models without AR steps (`level0: nar`, the shipped one) only ever take the dense path: for them int8/int4
are bf16 with rounded weights and more memory (`valle synth` says so).

Only plain `nn.Linear` layers are replaced (transformers' and ours, the level heads, the text head), except
those a backbone names in `unquantized` (layers whose weights it reads directly, as mamba's `dt_proj`);
bitnet's `BitLinear` is already ternary and stays. Quantize after loading: a quantized layer refuses a state
dict. Quality against fp32 is measured on a trained model's held-out loss, every level through the quantized
kernels (docs/benchmarks.md, "Lighter weights").
"""

from __future__ import annotations

import torch
from torch import nn

ROWS_FOR_MATMUL = 16  # more rows than this: the bf16 copy and a dense matmul (see the module docstring)
INT4_GROUP = 64  # inputs per int4 scale and zero point


class QuantLinear(nn.Module):
    """What the int8 and int4 linears share: bias, the bf16 copy for many rows, the dispatch on rows."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.force_kernel = False  # every row through the quantized kernel (bench/weights.py)
        self.act_dtype = dtype
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        self.register_buffer("bias", bias)

    def keep_dense(self, weights: torch.Tensor) -> None:
        """The many-row path's weights (out, in): the quantized ones, dequantized once (not saved)."""
        self.register_buffer("dense", weights.to(self.act_dtype).contiguous(), persistent=False)

    def dequantized(self) -> torch.Tensor:
        """(out, in) weights as rounded (what the kernel computes with), in the activation dtype."""
        return self.dense

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        raise RuntimeError(
            f"{prefix.rstrip('.') or type(self).__name__}: a quantized layer cannot load weights; load the full "
            "model, then quantize it (valle_cli/model/quant.py)"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.dense.dtype)
        if x2.device.type == "cpu" and (x2.shape[0] <= ROWS_FOR_MATMUL or self.force_kernel):
            out = self.kernel(x2.contiguous())
        else:
            out = nn.functional.linear(x2, self.dense)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


class Int8Linear(QuantLinear):
    """`nn.Linear` with int8 weights (per-output-row scales) and bf16 activations."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__(linear, dtype)
        w = linear.weight.detach().float()
        scales = w.abs().amax(1).clamp_min(1e-12) / 127.0
        self.register_buffer("weight", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(dtype))
        self.keep_dense(self.weight.float() * self.scales.float()[:, None])

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def int4_fits(linear: nn.Linear) -> bool:
    return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0


class Int4Linear(QuantLinear):
    """`nn.Linear` with int4 weights (a scale and a zero point per `INT4_GROUP` inputs of a row), bf16
    activations. The shape must fit the kernel (`int4_fits`)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        if not int4_fits(linear):
            raise ValueError(f"int4 needs inputs a multiple of {INT4_GROUP} and outputs of 16: {linear}")
        super().__init__(linear, dtype)
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.reshape(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-12)
        q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(n, k)
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2))
        # the kernel's layout: (groups, out, [scale, zero]) with w = (q - 8) * scale + zero
        zero = low + 8 * scale
        self.register_buffer("scales_zeros", torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous())
        sz = self.scales_zeros.float().transpose(0, 1)  # (out, groups, 2): the rounded scales the kernel uses
        q = q.reshape(n, k // INT4_GROUP, INT4_GROUP)
        self.keep_dense(((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(n, k))

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2, self.weight, INT4_GROUP, self.scales_zeros)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weights (groups of {INT4_GROUP})"


def quantize(model: nn.Module, bits: int = 8, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cast `model` to `dtype` and replace every plain `nn.Linear` in it by an `Int8Linear` (`bits` 8) or an
    `Int4Linear` where the shape fits the kernel, else an `Int8Linear` (`bits` 4), in place, except the layers
    a backbone reads the weights of (`Backbone.unquantized`), which stay `dtype`. Returns how many layers were
    replaced."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    model.to(dtype)
    keep = {  # layers whose weights a backbone reads directly (`Backbone.unquantized`)
        id(sub)
        for m in model.modules()
        if getattr(m, "unquantized", ())
        for name, sub in m.named_modules()
        if name.rsplit(".", 1)[-1] in m.unquantized
    }
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and id(child) not in keep
    ]
    for parent, name, child in swaps:
        kind = Int4Linear if bits == 4 and int4_fits(child) else Int8Linear
        setattr(parent, name, kind(child, dtype))
    return len(swaps)


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """`quantize(model, 8)`."""
    return quantize(model, 8, dtype)


WEIGHT_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")  # `valle synth --dtype`, `valle serve --dtype`


def check_dtype(dtype: str) -> None:
    if dtype not in WEIGHT_DTYPES:
        from valle_cli.errors import ValleError

        raise ValleError(
            f"unknown --dtype {dtype!r}", f"use {', '.join(WEIGHT_DTYPES[:-1])} or {WEIGHT_DTYPES[-1]}"
        )


def dtype_note(model: nn.Module, dtype: str) -> str | None:
    """What a user should know about `dtype` on this model, or None: int8/int4 without AR steps gain nothing."""
    if dtype in ("int8", "int4") and getattr(model, "nar0", False):
        return (
            f"note: this model makes level 0 in parallel passes (no AR steps), where --dtype {dtype} computes "
            "as bf16 with rounded weights and more memory: --dtype bf16 is as fast"
        )
    return None


def set_dtype(model: nn.Module, dtype: str) -> None:
    """What `valle synth --dtype` does: fp32 (nothing), fp16 or bf16 (a cast), int8 or int4 (`quantize`)."""
    from valle_cli.infer.load import DTYPES

    check_dtype(dtype)
    if dtype in ("int8", "int4"):
        device = next(model.parameters()).device
        if device.type != "cpu":
            from valle_cli.errors import ValleError

            raise ValleError(
                f"--dtype {dtype} is for decoding on a CPU (its kernels are CPU kernels), not on {device}",
                "on a GPU use --dtype bf16 or fp16",
            )
        quantize(model, int(dtype[3:]))
    elif dtype != "fp32":
        model.to(DTYPES[dtype])
