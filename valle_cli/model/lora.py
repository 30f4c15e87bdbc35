"""LoRA adapters (Hu et al.): fine-tune a trained model by learning low-rank updates of chosen linear layers.

`apply_lora(model, cfg)` wraps every `nn.Linear` of the backbone whose name ends with one of
`train.lora.targets` (default the attention projections q/k/v/o) in a `LoRALinear`: the original layer,
frozen, plus `B @ A` scaled by alpha / rank (A random, B zero, so training starts from the base model
exactly). Everything else is frozen too. Only adapter tensors (names containing `lora_`) are trained and
saved; `merge_lora` folds them into the base weights (for export), after which the model is a plain model
again.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from valle_cli.errors import ConfigError


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def merged(self) -> nn.Linear:
        out = self.base
        with torch.no_grad():
            out.weight += (self.lora_B @ self.lora_A).to(out.weight.dtype) * self.scaling
        return out


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Wrap the targeted linear layers of `model.backbone`; freeze everything else. Returns wrapped names."""
    allowed = getattr(model.backbone, "lora_targets", None)
    if allowed is not None and (not allowed or any(t not in allowed for t in targets)):
        refusal = getattr(model.backbone, "lora_refusal", "")
        raise ConfigError(
            f"LoRA cannot adapt {'the ' + model.cfg.backbone + ' backbone' if not allowed else targets}: {refusal}",
            f"set train.lora.targets to some of {list(allowed)}"
            if allowed
            else "fine-tune it fully (train.lora.rank=0)",
        )
    wrapped = []
    for name, module in list(model.backbone.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in targets):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped.append(full)
    if not wrapped:
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.backbone.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"train.lora.targets {targets} match no linear layer of the {model.cfg.backbone} backbone",
            f"its linear layers are named {', '.join(names)}: set train.lora.targets to some of them",
        )
    for pname, p in model.named_parameters():
        p.requires_grad_("lora_" in pname)
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base layer and unwrap it. Returns how many were merged."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                count += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return count
