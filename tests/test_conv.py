"""The patch-GEMM convolution against oneDNN's through autograd."""
import pytest
import torch
import torch.nn.functional as F

import gcvimoe.models.conv as conv
from gcvimoe.models.conv import conv2d_patch_grad, conv2d_weight_grad


@pytest.mark.parametrize('size, kernel, stride, padding', [
    ((8, 8), 3, 2, 1),  # GC ViT's downsample
    ((7, 9), 3, 2, 1),  # odd maps: the last output row/column has no bottom/right neighbour
    ((1, 1), 3, 2, 1),  # one pixel: every tap but the centre is padding
    ((6, 5), 3, 1, 1),
    ((5, 6), 2, 1, 0),
    ((9, 7), 3, 3, 2),  # padding wider than half the kernel: whole output rows read only zeros in some taps
], ids=str)
@pytest.mark.parametrize('channels_last', [True, False], ids=['channels_last', 'contiguous'])
def test_equals_conv2d_gradients(size, kernel, stride, padding, channels_last, monkeypatch):
    monkeypatch.setattr(conv, 'PATCH_ROWS', 20)  # several image groups, so the GEMMs accumulate
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 4, *size).contiguous(memory_format=fmt)
    weight, bias = torch.randn(5, 4, kernel, kernel), torch.randn(5)
    results = []
    for fn in (F.conv2d, conv2d_patch_grad):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(inputs[0], inputs[1], inputs[2], (stride, stride), (padding, padding))
        grad = torch.randn_like(out, memory_format=torch.contiguous_format) if not results else results[0][1]
        out.backward(grad)
        results.append((out.detach(), grad, *(t.grad for t in inputs)))
    (expected, _, *expected_grads), (actual, _, *actual_grads) = results
    torch.testing.assert_close(actual, expected)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads):
        torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_weight_grad_by_hand():
    """A 1-channel 2x2 map, 3x3 kernel, stride 2, padding 1: one output, each tap sees one pixel or padding."""
    x = torch.tensor([[1., 2.], [3., 4.]]).view(1, 1, 2, 2)
    grad_out = torch.full((1, 1, 1, 1), 2.)
    expected = torch.tensor([[0., 0., 0.], [0., 2., 4.], [0., 6., 8.]]).view(1, 1, 3, 3)
    torch.testing.assert_close(conv2d_weight_grad(x, grad_out, (3, 3), (2, 2), (1, 1)), expected)


def test_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: conv2d_patch_grad(x, w, None, (2, 2), (1, 1)), (x, weight))


def test_frozen_weight_gives_only_the_input_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3)
    conv2d_patch_grad(x, weight, None, (2, 2), (1, 1)).square().sum().backward()
    expected = x.detach().clone().requires_grad_()
    F.conv2d(expected, weight, stride=2, padding=1).square().sum().backward()
    torch.testing.assert_close(x.grad, expected.grad)


@pytest.mark.parametrize('in_channels', [8, 64], ids=['oneDNN', 'patch GEMM'])
def test_patch_grad_conv_module_equals_conv2d(in_channels, monkeypatch):
    """Same output, gradients, state dict and hooks as nn.Conv2d; the patch path runs from 64 input channels."""
    calls = []
    monkeypatch.setattr(conv, 'conv2d_patch_grad', lambda *args: calls.append(1) or conv._Conv2dPatchGrad.apply(
        args[0], args[1], args[2], tuple(args[3]), tuple(args[4])))
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(in_channels, 6, 3, 2, 1, bias=False)
    module = conv.PatchGradConv2d(in_channels, 6, 3, 2, 1, bias=False)
    module.load_state_dict(reference.state_dict())
    assert list(module.state_dict()) == list(reference.state_dict())
    hooked = []
    module.register_forward_hook(lambda *_: hooked.append(1))
    x = torch.randn(2, in_channels, 7, 7).contiguous(memory_format=torch.channels_last)
    outputs = [m(x) for m in (reference, module)]
    grad = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(grad)
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(module.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    assert hooked == [1] and len(calls) == (in_channels >= conv.MIN_PATCH_CHANNELS)
    with torch.no_grad():  # inference: plain oneDNN
        module(x)
    assert len(calls) == (in_channels >= conv.MIN_PATCH_CHANNELS)


def test_empty_batch_gives_zero_weight_gradient():
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    weight = torch.randn(5, 4, 3, 3, requires_grad=True)
    conv2d_patch_grad(x, weight, None, (2, 2), (1, 1)).sum().backward()
    torch.testing.assert_close(weight.grad, torch.zeros_like(weight))
