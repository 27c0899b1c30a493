"""The fused LoRA path computes what PEFT computes (values and gradients), and steps aside when it must."""

from __future__ import annotations

import copy

import pytest
import torch

from character_baker.core.config import LoraConfig
from character_baker.stages.training.fused_lora import _plain_adapter, fuse_lora_layers


def _lora_model(tiny_tok, arch="llama", dropout=0.0):
    from character_baker.backends.models import attach_lora
    from character_baker.testing import tiny_model

    model = attach_lora(tiny_model(arch, tiny_tok), LoraConfig(r=4, alpha=8, dropout=dropout), seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model


def _loss_and_grads(model, input_ids, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=input_ids).logits
    loss = torch.log_softmax(logits.float(), -1)[..., 7].mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return logits.detach().float(), grads


def _relative_error(value, reference):
    return ((value - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_forward_and_gradients_match_peft(tiny_tok, arch):
    peft_model = _lora_model(tiny_tok, arch)
    fused_model = copy.deepcopy(peft_model)
    # 'all-linear': q, k, v, o, gate, up, down in every decoder layer
    assert fuse_lora_layers(fused_model) == 7 * len(fused_model.get_base_model().get_decoder().layers)
    input_ids = torch.randint(0, 200, (2, 12))
    expected_logits, expected_grads = _loss_and_grads(peft_model, input_ids, autocast=False)
    logits, grads = _loss_and_grads(fused_model, input_ids, autocast=False)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert _relative_error(grads[name], expected_grads[name]) < 1e-4, name


def test_fused_bf16_autocast_is_as_accurate_as_peft(tiny_tok):
    peft_model = _lora_model(tiny_tok)
    fused_model = copy.deepcopy(peft_model)
    fuse_lora_layers(fused_model)
    input_ids = torch.randint(0, 200, (2, 12))
    exact_logits, exact_grads = _loss_and_grads(peft_model, input_ids, autocast=False)
    peft_logits, peft_grads = _loss_and_grads(peft_model, input_ids, autocast=True)
    fused_logits, fused_grads = _loss_and_grads(fused_model, input_ids, autocast=True)
    assert _relative_error(fused_logits, exact_logits) <= 1.5 * _relative_error(peft_logits, exact_logits) + 1e-3
    fused_error = max(_relative_error(fused_grads[n], exact_grads[n]) for n in exact_grads)
    peft_error = max(_relative_error(peft_grads[n], exact_grads[n]) for n in exact_grads)
    assert fused_error <= 1.5 * peft_error + 1e-3, (fused_error, peft_error)


def test_disabled_adapter_and_dropout_use_peft_forward(tiny_tok):
    model = _lora_model(tiny_tok)
    fuse_lora_layers(model)
    input_ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=input_ids).logits
    layer = model.get_base_model().get_decoder().layers[0].self_attn.q_proj
    with model.disable_adapter():
        assert _plain_adapter(layer) is None
    assert _plain_adapter(layer) == "default"
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        plain = model.get_base_model()(input_ids=input_ids)
    assert not torch.allclose(base_logits, adapted)  # the adapter is on again after the context
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=input_ids).logits, base_logits)
    assert torch.allclose(plain.logits, adapted)
    dropout_layer = _lora_model(tiny_tok, dropout=0.1).get_base_model().get_decoder().layers[0].self_attn.q_proj
    assert _plain_adapter(dropout_layer) is None
