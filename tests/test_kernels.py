"""Every kernel in gcvimoe.kernels against the plain PyTorch path it replaces, through the whole model."""
import pytest
import torch

import gcvimoe
from gcvimoe import kernels
from gcvimoe.moe import collect_aux_loss


def _outputs(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.square().sum() + collect_aux_loss(model)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    return out.detach(), grads, evaluated


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_each_kernel_equals_the_plain_path(kernel):
    """Outputs and every gradient with one kernel on equal those with all kernels off (no dropout, so the random
    streams cannot differ), in training and in evaluation."""
    torch.manual_seed(0)
    # 64 input channels at the stage downsamples reach the conv kernel; 4 experts on few tokens share chunks
    model = gcvimoe.create_model("gcvimoe_xxtiny", num_experts=4, img_size=64, num_classes=10, expert_dropout=0.0)
    x = torch.randn(2, 3, 64, 64)
    with kernels.enabled_only(()):
        plain = _outputs(model, x)
    with kernels.enabled_only({kernel}):
        fast = _outputs(model, x)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[2], plain[2], rtol=1e-4, atol=1e-5)
    assert fast[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(fast[1][name], plain[1][name], rtol=1e-3, atol=1e-5, msg=name)


def test_switch_rejects_unknown_names_and_restores():
    before = kernels.set_enabled(True)
    with pytest.raises(ValueError, match="unknown kernels"):
        kernels.set_enabled({"attention", "warp_drive"})
    with kernels.enabled_only(False):
        assert not any(kernels.enabled(name) for name in kernels.KERNELS)
    assert all(kernels.enabled(name) for name in kernels.DEFAULT_ENABLED)
    kernels.set_enabled(before)


def test_dropout_bits_is_inverted_dropout_at_the_rate_asked():
    """Every element is dropped (0) or scaled by 1 / keep, and the kept share is the keep probability."""
    from gcvimoe.kernels.dropout import dropout_bits
    from gcvimoe.kernels.experts import dropout_keep

    torch.manual_seed(0)
    x = torch.rand(512, 768) + 0.5
    out = dropout_bits(x, 0.1)
    keep = dropout_keep(0.1)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / keep)
    assert abs(kept.float().mean().item() - keep) < 0.003  # 393216 draws: the standard error is 0.0005
    assert dropout_bits(x, 0.0) is x


def test_experts_with_dropout_bits_compile_fullgraph_and_drop():
    """Under torch.compile the experts draw their dropout through the custom operator, in one graph."""
    from gcvimoe.moe import MoE

    torch.manual_seed(0)
    layer = MoE(8, 16, num_experts=4, expert_dropout=0.5).train()
    x = torch.randn(64, 8, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    with torch.no_grad(), kernels.enabled_only(False):
        layer.eval()
        no_dropout = layer(x)
    assert not torch.allclose(out, no_dropout)  # something was dropped
    assert x.grad is not None and torch.isfinite(x.grad).all()
