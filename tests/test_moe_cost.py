"""The op and byte counter of ``benchmarks/op_counter.py`` on cases counted by hand, and the GPU expert path's cost
per layer step held where ``benchmarks/moe_cost.py`` measured it (counts, not timings)."""
import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
from moe_cost import build, count_step  # noqa: E402
from op_counter import OpCounter, tensor_bytes  # noqa: E402

from gcvimoe.moe.backends import set_expert_path  # noqa: E402


def test_counter_counts_a_hand_counted_step():
    """``relu(a @ b + c).sum()`` with a [4, 8] @ [8, 2] product: addmm, relu and sum launch; ``t`` is a view.
    Bytes: addmm reads 4*2 + 32 + 16 floats and writes 8; relu reads and writes 8; sum reads 8 and writes 1."""
    a, b, c = torch.randn(4, 8), torch.randn(8, 2), torch.randn(2)
    with OpCounter() as counter:
        torch.relu(torch.addmm(c, a, b.t().t())).sum()
    assert counter.sequence == ['addmm', 'relu', 'sum']
    assert counter.views == 2
    assert counter.bytes == 4 * ((2 + 32 + 16 + 8) + (8 + 8) + (8 + 1))
    assert counter.syncs == 0


def test_counter_counts_in_place_ops_once_and_expanded_tensors_by_their_memory():
    x, y = torch.randn(100), torch.randn(1)
    with OpCounter() as counter:
        x.add_(y.expand(100))  # reads x (100) and y's one element, writes x: the output is the input
        x.sum().item()  # a read back to the host: a sync, not a kernel
    assert counter.sequence == ['add_', 'sum']
    assert counter.by_op['add_'] == [1, 4 * (100 + 1)]
    assert counter.syncs == 1
    assert tensor_bytes(torch.randn(3, 1).expand(3, 5)) == 12


def test_counter_skips_views_allocations_and_identities():
    x = torch.randn(4, 4)
    with OpCounter() as counter:
        torch.empty(4)
        x.view(16).t() if False else x.t()
        torch.nn.functional.dropout(x, 0.5, training=False)
    assert counter.launches == 0 and counter.views == 1


@pytest.fixture
def grouped_path():
    previous = set_expert_path('grouped_mm')
    yield
    set_expert_path(previous)


def test_gpu_path_step_stays_within_its_measured_cost(grouped_path):
    """One MoE layer step on the GPU's path (D 96, H 192, E 8, k 1, T 2048, capacity 1.25): the launches and bytes
    that ``benchmarks/moe_cost.py`` measured at the issue's size, so a change that adds ops or passes fails here."""
    args = argparse.Namespace(dim=96, hidden=192, experts=8, top_k=1, tokens=2048, capacity=1.25)
    dense, moe, x, grad = build(args)
    dense_forward, dense_backward, dense_flops = count_step(dense, x, grad, train=True)
    forward, backward, flops = count_step(moe, x, grad, train=True)
    assert forward.launches <= 32 and backward.launches <= 30
    assert forward.syncs == backward.syncs == 0
    assert 'index_add' not in forward.counts() + backward.counts()  # no atomics: a deterministic step
    ratio = (forward.bytes + backward.bytes) / (dense_forward.bytes + dense_backward.bytes)
    assert ratio < 1.9, ratio
    # the dense GEMMs, plus: the router (forward, two gradients), fc1's bias rows (8 more rows of K in three GEMMs),
    # fc2's bias as (gates one-hot) @ bias and its two gradients, and the gates' gradient (a row-wise dot)
    t, d, h, e = args.tokens, args.dim, args.hidden, args.experts
    assert flops == dense_flops + 6 * t * d * e + 3 * 2 * t * 8 * h + 6 * t * e * d + 2 * t * d
    inference, _, _ = count_step(moe, x, grad, train=False)
    assert inference.launches <= 23 and inference.syncs == 0


@pytest.fixture
def fused_path():
    pytest.importorskip('triton')
    previous = set_expert_path('triton')
    yield
    set_expert_path(previous)


def test_fused_path_step_stays_within_the_issue_targets(fused_path):
    """The fused path (its kernels interpreted here, each one op) at a small size: a train step within 30 ops forward
    and 30 backward, inference within 20, no host sync, no atomics, and the GEMM FLOPs of the dense MLP plus the
    router (forward and its two gradients) and the gates' gradient: the kernels do no padded or extra work."""
    import moe_cost
    moe_cost._add_fused_formulas()
    args = argparse.Namespace(dim=32, hidden=64, experts=4, top_k=1, tokens=512, capacity=1.25)
    dense, moe, x, grad = build(args)
    _, _, dense_flops = count_step(dense, x, grad, train=True)
    forward, backward, flops = count_step(moe, x, grad, train=True)
    assert {'rows_gemm', 'rows_gemm_gate_grad', 'expert_weight_grad'} <= set(forward.counts() + backward.counts())
    assert forward.launches <= 30 and backward.launches <= 30, (forward.sequence, backward.sequence)
    assert forward.syncs == backward.syncs == 0
    assert not {'index_add', 'index_add_', 'scatter_add', 'scatter_add_'} & set(forward.counts() + backward.counts())
    t, d, h, e = args.tokens, args.dim, args.hidden, args.experts
    assert flops == dense_flops + 6 * t * d * e + 2 * t * h  # the gate's gradient: a dot over each row's hidden values
    inference, _, _ = count_step(moe, x, grad, train=False)
    assert inference.launches <= 20 and inference.syncs == 0
