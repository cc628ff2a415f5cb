"""A convolution whose weight gradient is a GEMM over gathered patches, for CPU training of strided convs.

oneDNN computes the weight gradient of GC ViT's 3x3 stride-2 downsampling convolutions (channels-last, fp32, a
2-core CPU) in about twice the time of their forward. :func:`conv2d_patch_grad` keeps oneDNN for the forward and the
input gradient, and computes the weight gradient as ``patches^T @ grad_out``: the patches of a few images at a time
are gathered into a ``[rows, kh * kw * c_in]`` buffer that stays in cache (a channels-last im2col, nine strided
copies for a 3x3 kernel), then one GEMM per group of images accumulates the gradient. Weight gradient alone, batch 8,
15 interleaved rounds: 44.0 -> 24.6 ms at the stem's 112 px map, 16.5 -> 9.8, 14.4 -> 8.9 and 15.4 -> 11.1 ms at
the stage downsamples, 90 -> 54 ms per train step (``benchmarks/RESULTS.md``). It does not pay with fewer than
64 input channels, whose patch rows are too short to gather fast (32 channels, batch 128, 16 px map: 13.3 against
7.4 ms forward and backward; the stem's first conv, 3 channels: slower too), so :class:`PatchGradConv2d` keeps oneDNN
there.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PATCH_ROWS = 8192  # output positions gathered per GEMM (whole images, at least one): two images at 56 x 56 outputs
MIN_PATCH_CHANNELS = 64  # input channels from which the patch gather (rows of c_in floats) beats oneDNN


def _valid_outputs(size: int, out_size: int, tap: int, stride: int, padding: int) -> Tuple[int, int]:
    """The output positions ``[start, stop)`` whose input position ``stride * o + tap - padding`` lies in the map."""
    start = max(0, -((tap - padding) // stride))
    last_input = size - 1 - tap + padding  # stride * o <= last_input
    stop = min(out_size, last_input // stride + 1) if last_input >= 0 else 0
    return start, max(start, stop)


def conv2d_weight_grad(x: Tensor, grad_out: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                       padding: Sequence[int]) -> Tensor:
    """The gradient of ``conv2d(x, weight, stride=stride, padding=padding)`` with respect to ``weight``.

    Args:
        x: Input ``[b, c_in, h, w]``, best channels-last (then every patch copy reads contiguous channel rows).
        grad_out: Gradient of the output ``[b, c_out, h_out, w_out]``.
        kernel_size: ``(kh, kw)``.
        stride: ``(sh, sw)``.
        padding: ``(ph, pw)``, zeros.

    Returns:
        ``[c_out, c_in, kh, kw]``, contiguous.
    """
    b, c_in, h, w = x.shape
    c_out, h_out, w_out = grad_out.shape[1:]
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if b == 0:  # no image, no gradient (and no GEMM to write one)
        return x.new_zeros(c_out, c_in, kh, kw)
    x_nhwc = x.permute(0, 2, 3, 1)
    grad_nhwc = grad_out.permute(0, 2, 3, 1)
    images = max(1, PATCH_ROWS // max(1, h_out * w_out))
    patches = x.new_empty(min(images, b), h_out, w_out, kh, kw, c_in)
    grad_weight = x.new_empty(kh * kw * c_in, c_out)
    rows_of = [_valid_outputs(h, h_out, tap, sh, ph) for tap in range(kh)]
    cols_of = [_valid_outputs(w, w_out, tap, sw, pw) for tap in range(kw)]
    # zero padding: the taps that fall outside the map, along the borders; the copies below never write there, so
    # the zeros hold for every group of images
    for dy, (r0, r1) in enumerate(rows_of):
        for dx, (c0, c1) in enumerate(cols_of):
            tap = patches[:, :, :, dy, dx]
            for part in (tap[:, :r0], tap[:, r1:], tap[:, r0:r1, :c0], tap[:, r0:r1, c1:]):
                if part.numel():
                    part.zero_()
    for start in range(0, b, images):
        stop = min(b, start + images)
        chunk = patches[:stop - start]
        for dy, (r0, r1) in enumerate(rows_of):
            for dx, (c0, c1) in enumerate(cols_of):
                tap = chunk[:, :, :, dy, dx]
                if r1 > r0 and c1 > c0:
                    y0, x0 = sh * r0 + dy - ph, sw * c0 + dx - pw
                    tap[:, r0:r1, c0:c1].copy_(x_nhwc[start:stop, y0:y0 + sh * (r1 - r0 - 1) + 1:sh,
                                                      x0:x0 + sw * (c1 - c0 - 1) + 1:sw])
        rows = chunk.view(-1, kh * kw * c_in)
        grads = grad_nhwc[start:stop].reshape(-1, c_out)
        if start == 0:
            torch.mm(rows.t(), grads, out=grad_weight)
        else:
            grad_weight.addmm_(rows.t(), grads)
    return grad_weight.view(kh, kw, c_in, c_out).permute(3, 2, 0, 1).contiguous()


class _Conv2dPatchGrad(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if need_weight:
            grad_weight = conv2d_weight_grad(x, grad_out, weight.shape[2:], ctx.stride, ctx.padding)
        if need_bias:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


def conv2d_patch_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: Sequence[int] = (1, 1),
                      padding: Sequence[int] = (0, 0)) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (no groups, no dilation) with the weight gradient of
    :func:`conv2d_weight_grad`; no double backward.

    Args:
        x: Input ``[b, c_in, h, w]``.
        weight: ``[c_out, c_in, kh, kw]``.
        bias: ``[c_out]`` or None.
        stride: ``(sh, sw)``.
        padding: ``(ph, pw)``, zeros.

    Returns:
        ``[b, c_out, h_out, w_out]`` in ``x``'s memory format.
    """
    return _Conv2dPatchGrad.apply(x, weight, bias, tuple(stride), tuple(padding))


class PatchGradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state dict and hooks) whose CPU training backward takes the weight gradient
    from :func:`conv2d_weight_grad`, when it pays: at least ``MIN_PATCH_CHANNELS`` input channels, no groups,
    dilation or non-zero padding mode, not under autocast or ``torch.compile``."""

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and x.device.type == 'cpu' and self.in_channels >= MIN_PATCH_CHANNELS
                and self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == 'zeros'
                and isinstance(self.padding, tuple) and not torch.is_autocast_enabled('cpu')
                and not torch.compiler.is_compiling()):
            return conv2d_patch_grad(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)
