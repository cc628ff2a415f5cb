"""Every registered gcvimoe model, dense and MoE, is shared the way timm users share models: ``safetensors`` on
its ``state_dict()`` and timm's ``save_for_hf`` (which ``push_to_hf_hub`` calls), both loading back to equal logits."""
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

import gcvimoe  # noqa: F401  (registers the models)
from gcvimoe.moe import moe_layers

NAMES = timm.list_models('gcvimoe_*')
SMALL_VARIANTS = ('gcvimoe_pico', 'gcvimoe_nano')  # built for 32 px grey images by default
# the widest variants round-trip the same tensors with wider layers; they only cost time (make test-slow runs them)
BIG = ('gcvimoe_tiny2', 'gcvimoe_small', 'gcvimoe_small2', 'gcvimoe_base', 'gcvimoe_large')


@pytest.mark.parametrize('num_experts', [0, 8])
@pytest.mark.parametrize('name', NAMES)
def test_every_weight_and_buffer_is_contiguous(name, num_experts):
    """safetensors refuses a non-contiguous tensor; checked on the variant as registered, built without memory."""
    model = timm.create_model(name, num_experts=num_experts, device='meta')
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers()), **model.state_dict()}
    assert [key for key, tensor in tensors.items() if not tensor.is_contiguous()] == []


def _small_build(name: str, num_experts: int) -> dict:
    """The variant's widths, heads and MLP ratio at 32 px; the large ones with fewer blocks to stay fast."""
    few_blocks = {} if name in SMALL_VARIANTS else {'img_size': 32, 'depths': (1, 1, 2, 1)}
    return dict(num_classes=5, num_experts=num_experts, **few_blocks)


@pytest.mark.parametrize('num_experts', [0, 2])
@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in NAMES])
def test_safetensors_and_save_for_hf_load_back_to_equal_logits(name, num_experts, tmp_path):
    kwargs = _small_build(name, num_experts)
    model = timm.create_model(name, **kwargs).eval()
    assert (len(list(moe_layers(model))) > 0) == (num_experts > 0)
    x = torch.randn(2, model.in_chans, 32, 32)
    with torch.no_grad():
        logits = model(x)

    save_file(model.state_dict(), tmp_path / 'weights.safetensors')
    fresh = timm.create_model(name, **kwargs).eval()
    fresh.load_state_dict(load_file(tmp_path / 'weights.safetensors'))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), logits, rtol=0, atol=0)

    save_for_hf(model, tmp_path / 'hub', safe_serialization=True)
    assert (tmp_path / 'hub' / 'model.safetensors').is_file()
    shared = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(shared(x), logits, rtol=0, atol=0)
