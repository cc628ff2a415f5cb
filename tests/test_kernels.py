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
