"""A fused forward/backward for plain LoRA linear layers (same math as PEFT, fewer kernels).

peft <= 0.21 computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate kernels:
the base GEMM, two small GEMMs, a full-size multiply by `scaling`, a full-size add (and in
backward a full-size multiply and a gradient sum for x). On an 8B model those full-size
element-wise passes cost about a tenth of a training step. Here:

    forward    out = x W^T (+ bias);  out += (x A^T) (s B)^T      # the add is the GEMM's epilogue
    backward   gx  = g W;  gx += (g s B) A                      # likewise
               gA  = (g s B)^T x;  gB = s g^T (x A^T)

`s B` is a [out, r] matrix, so folding the scale into it is free. It runs in the autocast
dtype when autocast is on (as PEFT under autocast does) and keeps only `x A^T` ([tokens, r])
beyond what the base layer saves. Layers with dropout, DoRA or other variants, several active
adapters, merged weights or a disabled adapter fall back to PEFT's own forward, so
`disable_adapter()` (the reference pass) behaves exactly as in PEFT.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        hidden = flat @ lora_a.t()
        scaled_b = lora_b * scaling
        out = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
        out.addmm_(hidden, scaled_b.t())
        ctx.save_for_backward(flat, weight, lora_a, scaled_b, hidden)
        ctx.scaling, ctx.input_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        flat, weight, lora_a, scaled_b, hidden = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_hidden = grad @ scaled_b
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).addmm_(grad_hidden, lora_a).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t() @ flat
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        grad_a = grad_hidden.t() @ flat if ctx.needs_input_grad[3] else None
        grad_b = (grad.t() @ hidden) * ctx.scaling if ctx.needs_input_grad[4] else None
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None


def fused_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """x W^T + b + scaling * (x A^T) B^T, in the autocast dtype when autocast is on."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731 (differentiable casts)
    with torch.autocast(device, enabled=False):
        return _FusedLoraLinear.apply(cast(x), cast(weight), cast(bias), cast(lora_a), cast(lora_b), scaling)


def _plain_adapter(layer: nn.Module) -> str | None:
    """The single active adapter of a layer if the fused path computes exactly what PEFT would."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    plain = (adapter in layer.lora_A and adapter not in layer.lora_variant and not layer.fan_in_fan_out
             and isinstance(layer.lora_dropout[adapter], nn.Identity) and isinstance(layer.base_layer, nn.Linear))
    return adapter if plain else None


def _forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapter = None if args or kwargs else _plain_adapter(self)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return fused_lora_linear(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                             self.scaling[adapter])


def fuse_lora_layers(model: nn.Module) -> int:
    """Route every PEFT LoRA Linear layer of `model` through the fused kernel; return how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [module for module in model.modules() if type(module) is LoraLinear]
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    return len(layers)
