"""Window attention with an additive bias, as one autograd node for CPU training.

``softmax(scale * q @ k^T + bias) @ v`` over small windows (GC ViT: 49 or 196 tokens). Autograd over the plain ops
allocates a fresh ``[b, h, n, n]`` tensor for the scores, for the biased scores and for the probabilities, and as many
in backward. Here the scale rides on the score GEMM (``alpha``), the bias is added in place, softmax and its backward
overwrite their input, and only the probabilities are saved: less memory allocated, hence less page-faulted in again.
Gradients equal the plain ops' to rounding. The plain path (:class:`gcvimoe.models.attention.WindowAttentionGlobal`
without this kernel) is ``F.scaled_dot_product_attention``; its CPU backward is what this kernel beats at these sizes
(``benchmarks/RESULTS.md``, "Kernels").
"""
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
