"""Window attention with an additive bias, as one autograd node for CPU training.

``softmax(scale * q @ k^T + bias) @ v`` over small windows (GC ViT: 49 or 196 tokens). Autograd over the plain ops
allocates a fresh ``[b, h, n, n]`` tensor for the scores, for the biased scores and for the probabilities, and as many
in backward. Here the scale rides on the score GEMM (``alpha``), the bias is added in place, softmax and its backward
overwrite their input, and only the probabilities are saved. At GC ViT-T's stage 3 (``n = 196``) a forward and
backward take 0.80x the time of the plain ops on a 2-core CPU; at ``n = 49``, about 0.9x. Most of that is memory
not allocated, hence not page-faulted in again after glibc trims its heap (0.93x at stage 3 when it never trims).
Gradients equal the plain ops' to rounding. The CPU flash kernel of ``F.scaled_dot_product_attention`` is slower
still in backward at these sizes, so inference keeps SDPA and training uses this.

The relative position bias comes from :func:`relative_bias`, a gather whose backward sums the gradient into the
table with two small one-hot GEMMs instead of a scatter-add.
"""
import math

import torch
from torch import Tensor


class _BiasedAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        b, h, n, d = q.shape
        q, k, v = (t.reshape(b * h, n, d) for t in (q, k, v))
        scores = torch.baddbmm(q.new_empty(b * h, n, n), q, k.transpose(1, 2), beta=0, alpha=scale)
        scores.view(b, h, n, n).add_(bias)
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.bias_shape = scale, bias.shape
        return torch.bmm(probs, v).view(b, h, n, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        b, h, n, d = grad_out.shape
        grad_out = grad_out.reshape(b * h, n, d)
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        grad_v = torch.bmm(probs.transpose(1, 2), grad_out).view(b, h, n, d) if need_v else None
        if not (need_q or need_k or need_bias):
            return None, None, grad_v, None, None
        grad_scores = torch.bmm(grad_out, v.transpose(1, 2))  # d probs, then d scores in its place
        torch.ops.aten._softmax_backward_data.out(grad_scores, probs, -1, probs.dtype, grad_input=grad_scores)
        grad_q = grad_k = grad_bias = None
        if need_q:
            grad_q = torch.baddbmm(q.new_empty(q.shape), grad_scores, k, beta=0, alpha=ctx.scale).view(b, h, n, d)
        if need_k:
            grad_k = torch.baddbmm(k.new_empty(k.shape), grad_scores.transpose(1, 2), q, beta=0, alpha=ctx.scale)
            grad_k = grad_k.view(b, h, n, d)
        if need_bias:
            grad_bias = grad_scores.view(b, h, n, n).sum_to_size(ctx.bias_shape)
        return grad_q, grad_k, grad_v, grad_bias, None


def biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """``softmax(scale * q @ k^T + bias) @ v`` with a hand-written backward (no double backward).

    Args:
        q: Queries ``[b, h, n, d]``.
        k: Keys ``[b, h, n, d]``.
        v: Values ``[b, h, n, d]``.
        bias: Additive scores, broadcastable to ``[b, h, n, n]`` (e.g. ``[1, h, n, n]``); ``-inf`` masks a key.
        scale: Multiplier of the dot products.

    Returns:
        ``[b, h, n, d]``.
    """
    return _BiasedAttention.apply(q, k, v, bias, scale)


def relative_offset_one_hot(size: int, table_size: int, device=None, dtype=None) -> Tensor:
    """``[size * size, 2 * table_size - 1]``: row ``(i, j)`` is the one-hot of offset ``i - j`` on a table that spans
    the offsets of a ``table_size`` window (``-(table_size - 1)`` at column 0)."""
    pos = torch.arange(size, device=device)
    offsets = (pos[:, None] - pos[None, :] + table_size - 1).reshape(-1, 1)
    return (offsets == torch.arange(2 * table_size - 1, device=device)).to(dtype)


class _RelativeBias(torch.autograd.Function):

    @staticmethod
    def forward(ctx, table, index, one_hot_y, one_hot_x):
        n = math.isqrt(index.numel())
        ctx.save_for_backward(one_hot_y, one_hot_x)
        # [heads, n * n]: the bias the attention adds to every window is contiguous
        return torch.index_select(table.t(), 1, index).view(1, table.shape[1], n, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        one_hot_y, one_hot_x = ctx.saved_tensors
        wh, ww = math.isqrt(one_hot_y.shape[0]), math.isqrt(one_hot_x.shape[0])
        heads = grad.shape[1]
        # the offset (dy, dx) of token pair ((yi, xi), (yj, xj)) splits into yi - yj and xi - xj: sum over the x pairs
        # of each offset dx, then over the y pairs of each dy (two small GEMMs: 0.33 ms at a 14 x 14 window and 8
        # heads, where the scatter-add took 1.8 ms)
        g = grad.sum(0) if grad.shape[0] > 1 else grad[0]
        g = g.reshape(heads, wh, ww, wh, ww).permute(0, 1, 3, 2, 4).reshape(heads * wh * wh, ww * ww)
        by_dx = torch.mm(g, one_hot_x).view(heads, wh * wh, -1)
        by_offset = torch.matmul(one_hot_y.t(), by_dx)  # [heads, 2 Wh - 1, 2 Ww - 1]
        return by_offset.reshape(heads, -1).t().contiguous(), None, None, None


def relative_bias(table: Tensor, index: Tensor, one_hot_y: Tensor, one_hot_x: Tensor) -> Tensor:
    """The relative position bias ``[1, heads, n, n]`` of a ``wh x ww`` window (n = wh * ww tokens).

    ``bias[h, i, j] = table[index[i * n + j], h]``, with the index of offset ``(dy, dx)`` equal to
    ``(dy + Wh - 1) * (2 Ww - 1) + dx + Ww - 1`` on a table of ``(2 Wh - 1) * (2 Ww - 1)`` rows (timm's layout; the
    window may be smaller than the table's ``Wh x Ww``). The backward sums the gradient into the table with
    ``one_hot_y`` (``[wh * wh, 2 Wh - 1]``) and ``one_hot_x`` (``[ww * ww, 2 Ww - 1]``) from
    :func:`relative_offset_one_hot` instead of scatter-adding it.
    No double backward.
    """
    return _RelativeBias.apply(table, index, one_hot_y, one_hot_x)
