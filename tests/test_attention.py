"""The hand-differentiated window attention against autograd over the plain ops."""
import pytest
import torch

from gcvimoe.kernels.attention import biased_attention


def _reference(q, k, v, bias, scale):
    return ((q * scale) @ k.transpose(-2, -1) + bias).softmax(-1) @ v


@pytest.mark.parametrize('masked', [False, True])
def test_biased_attention_equals_plain_ops(masked):
    torch.manual_seed(0)
    b, h, n, d = 3, 2, 9, 4
    # q, k, v as strided views of one qkv tensor, the way the model hands them over
    qkv = torch.randn(b, n, 3, h, d, requires_grad=True)
    table = torch.randn(1, h, n, n, requires_grad=True)  # broadcast over the batch, as the position bias is
    grad = torch.randn(b, h, n, d)
    results = []
    for fn in (_reference, biased_attention):
        qkv.grad = table.grad = None
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = table
        if masked:  # padded keys (-inf) in the last window, as WindowLayout masks them
            key_mask = torch.zeros(b, 1, 1, n).index_fill_(3, torch.tensor([7, 8]), float('-inf'))
            bias = table + key_mask
        out = fn(q, k, v, bias, d ** -0.5)
        out.backward(grad)
        results.append((out.detach(), qkv.grad.clone(), table.grad.clone()))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_biased_attention_gradcheck():
    torch.manual_seed(0)
    args = [torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, bias: biased_attention(q, k, v, bias, 0.7), (*args, bias))


def test_biased_attention_value_gradient_alone():
    """Only v needs a gradient (frozen q, k and bias): the backward skips the score gradient and still gets v's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 3) for _ in range(3))
    bias = torch.randn(1, 2, 4, 4)
    expected = v.clone().requires_grad_()
    _reference(q, k, expected, bias, 0.5).square().sum().backward()
    v.requires_grad_()
    biased_attention(q, k, v, bias, 0.5).square().sum().backward()
    torch.testing.assert_close(v.grad, expected.grad)


@pytest.mark.parametrize('window, table_window',
                         [((7, 7), (7, 7)), ((3, 5), (3, 5)), ((2, 4), (3, 5)), ((1, 1), (7, 7))], ids=str)
def test_relative_bias_equals_gathering_the_table(window, table_window):
    """The bias and its table gradient against indexing the table by hand, pair by pair."""
    from gcvimoe.models.attention import RelativePositionBias
    torch.manual_seed(0)
    heads = 3
    rel_pos = RelativePositionBias(table_window, heads).double()
    table = rel_pos.relative_position_bias_table
    coords = [(y, x) for y in range(window[0]) for x in range(window[1])]
    rows = torch.tensor([[(yi - yj + table_window[0] - 1) * (2 * table_window[1] - 1) + xi - xj + table_window[1] - 1
                          for yj, xj in coords] for yi, xi in coords])
    expected = table[rows].permute(2, 0, 1).unsqueeze(0)  # autograd's gather and scatter-add
    actual = rel_pos(window, torch.float64)
    assert actual.shape == expected.shape == (1, heads, len(coords), len(coords))
    assert torch.equal(actual, expected)
    for batch in (1, 2):  # the attention sums the bias's gradient over the batch, or broadcasts it over two
        grad = torch.randn(batch, heads, len(coords), len(coords), dtype=torch.float64)
        expected_grad, = torch.autograd.grad(expected.expand_as(grad), table, grad, retain_graph=True)
        actual_grad, = torch.autograd.grad(actual.expand_as(grad), table, grad, retain_graph=True)
        torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-12, atol=1e-12)
        assert (expected_grad == 0).any() == (window != table_window)  # a smaller window leaves offsets untouched
