"""Every expert path (``gcvimoe.moe.set_expert_path``) equals the plain path: outputs, input and parameter gradients,
aux loss and statistics, for every router, with capacity and dropless, in training and evaluation."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from gcvimoe import kernels
from gcvimoe.errors import GcvimoeError
from gcvimoe.moe import MoE
from gcvimoe.moe.backends import EXPERT_BACKENDS, ExpertBackend, register_expert_backend, set_expert_path
from gcvimoe.moe.dispatch import plan_dispatch, plan_sorted
from gcvimoe.moe.router import top_k_routing


PATHS = ('grouped_mm', 'cpu_kernel') + (('triton',) if importlib.util.find_spec('triton') else ())


@pytest.fixture
def pinned():
    previous = set_expert_path(None)
    yield
    set_expert_path(previous)


def _run(layer, x, grad, path):
    set_expert_path(path)
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(5)  # the same gate noise and dropout draws on every path
    out = layer(x)
    loss = (out * grad).sum() + layer.aux_loss
    if torch.is_grad_enabled():
        loss.backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    stats = layer.stats
    return out.detach(), x.grad, grads, layer.aux_loss.detach(), stats, dict(layer.losses)


CASES = [  # (router, top_k, capacity_factor, batch_priority, extra options)
    ('linear', 1, 1.0, True, {}),
    ('linear', 1, 0.0, True, {}),
    ('linear', 2, 0.75, True, {'normalize_gates': True}),
    ('linear', 2, 1.25, False, {'balance_loss': 'importance_load', 'gate_noise': 1.0}),
    ('linear', 2, 0.0, False, {'z_loss_weight': 0.01}),
    ('cosine', 1, 0.5, True, {'shared_expert': True}),
    ('cosine', 2, 0.0, True, {}),
    ('expert_choice', 1, 1.0, False, {}),
    ('expert_choice', 2, 0.0, False, {}),
    ('linear', 1, 1.25, True, {'normalize_gates': True, 'balance_loss': 'importance_load'}),
]


@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('bias', [True, (True, False), False])
@pytest.mark.parametrize('router, top_k, capacity_factor, batch_priority, options', CASES)
def test_every_path_equals_the_plain_path(pinned, router, top_k, capacity_factor, batch_priority, options, bias,
                                          training):
    torch.manual_seed(0)
    layer = MoE(16, 24, bias=bias, num_experts=4, top_k=top_k, router=router, capacity_factor=capacity_factor,
                eval_capacity_factor=capacity_factor, batch_priority=batch_priority, **options).train(training)
    x = torch.randn(2, 37, 16)
    x[0, :5] = x[0, 5:10]  # tied router probabilities: batch priority must keep token order among equals
    grad = torch.randn(2, 37, 16)
    reference = _run(layer, x, grad, 'plain')
    for path in PATHS:
        out, x_grad, grads, aux, stats, losses = _run(layer, x, grad, path)
        torch.testing.assert_close(out, reference[0], atol=1e-5, rtol=1e-5, msg=path)
        torch.testing.assert_close(x_grad, reference[1], atol=1e-5, rtol=1e-5, msg=path)
        assert grads.keys() == reference[2].keys()
        for name, value in grads.items():
            torch.testing.assert_close(value, reference[2][name], atol=1e-5, rtol=1e-5, msg=f"{path} {name}")
        torch.testing.assert_close(aux, reference[3])
        for field in ('tokens_per_expert', 'kept_tokens_per_expert', 'unrouted', 'top1_expert'):
            assert torch.equal(getattr(stats, field), getattr(reference[4], field)), (path, field)
        assert losses.keys() == reference[5].keys()


def test_sorted_plan_keeps_what_the_compacted_plan_keeps():
    """Hand-checked case: 6 tokens, 2 experts, capacity 2, batch priority; the sorted plan keeps the same (token,
    expert) pairs as the compacted plan and groups rows by expert in claiming order."""
    logits = torch.tensor([[2., 0.], [3., 0.], [0., 1.], [4., 0.], [1., 0.], [0., 5.]])
    routing = top_k_routing(logits, 1)
    plan = plan_sorted(routing, 2, capacity=2, batch_priority=True)
    # expert 0: tokens 3, 1, 0, 4 by descending probability; expert 1: tokens 5, 2
    assert plan.row_assignment.tolist() == [3, 1, 0, 4, 5, 2]
    assert plan.bounds.tolist() == [0, 4, 6]
    assert plan.keep.tolist() == [False, True, True, True, False, True]  # tokens 1, 3 (expert 0), 5, 2 (expert 1)
    compacted = plan_dispatch(routing, 2, capacity=2, batch_priority=True)
    kept = compacted.token_index[:int(compacted.tokens_per_expert.sum())]
    assert sorted(kept.tolist()) == sorted(plan.keep.nonzero().view(-1).tolist())
    assert torch.equal(plan.kept_per_token(6), compacted.kept_per_token(6))


def test_a_pinned_path_that_cannot_run_is_one_clear_error(pinned):
    layer = MoE(8, 16, num_experts=2, device='meta')
    set_expert_path('cpu_kernel')
    with pytest.raises(GcvimoeError, match="expert path 'cpu_kernel' cannot run meta tokens"):
        layer(torch.randn(4, 8, device='meta'))
    with pytest.raises(GcvimoeError, match="unknown expert path 'grouped'; did you mean 'grouped_mm'"):
        set_expert_path('grouped')


def test_the_environment_variable_pins_the_path():
    code = ("import torch; from gcvimoe.moe import MoE; from gcvimoe.moe import backends; "
            "calls = []; run = backends.EXPERT_BACKENDS['grouped_mm'].run; "
            "backends.EXPERT_BACKENDS['grouped_mm'] = backends.ExpertBackend("
            "lambda *a: calls.append(1) or run(*a), lambda t, e: False); "
            "MoE(8, 16, num_experts=2)(torch.randn(4, 8)); print(len(calls))")
    env = {**os.environ, 'GCVIMOE_EXPERT_PATH': 'grouped_mm'}
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == '1'


def test_a_new_backend_registers_in_a_few_lines(pinned):
    """The seam: a toy backend (the plain path, counting its calls) registered and pinned by name."""
    calls = []

    def run(experts, tokens, routing, num_experts, capacity, batch_priority):
        calls.append(tokens.shape)
        return EXPERT_BACKENDS['plain'].run(experts, tokens, routing, num_experts, capacity, batch_priority)

    register_expert_backend('toy', ExpertBackend(run, preferred=lambda tokens, experts: False))
    try:
        torch.manual_seed(0)
        layer, x = MoE(8, 16, num_experts=2), torch.randn(3, 8)
        expected = layer(x)
        set_expert_path('toy')
        torch.testing.assert_close(layer(x), expected)
        assert calls == [torch.Size([3, 8])]
    finally:
        del EXPERT_BACKENDS['toy']


def test_half_precision_router_takes_no_fp32_copy_of_the_tokens():
    """On a GPU (here: shapes only, on ``meta``) bf16 tokens meet the router in one GEMM with an fp32 result, and
    their gradient comes back in bf16: no fp32 ``[t, d]`` tensor is made, forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gcvimoe.moe.router import LinearRouter

    class Outputs(TorchDispatchMode):
        made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(value, torch.Tensor):
                    self.made.append((func.overloadpacket.__name__, value.dtype, tuple(value.shape)))
            return out

    router = LinearRouter(64, 8, device='meta')
    x = torch.empty(256, 64, device='meta', dtype=torch.bfloat16, requires_grad=True)
    with Outputs():
        logits = router(x)
        logits.sum().backward()
    assert logits.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert router.weight.grad.dtype == torch.float32
    assert not [made for made in Outputs.made if made[1:] == (torch.float32, (256, 64))], Outputs.made


@pytest.mark.skipif(not importlib.util.find_spec('triton'), reason="Triton is not installed")
@pytest.mark.parametrize('top_k, capacity_factor', [(1, 1.25), (2, 0.0)])
def test_the_fused_path_draws_the_same_expert_dropout(pinned, top_k, capacity_factor):
    """With kernels off, the ``grouped_mm`` path drops hidden units with ``nn.Dropout`` on the same sorted rows: one
    seed gives the fused path the same mask, so outputs and gradients match under dropout too."""
    torch.manual_seed(0)
    layer = MoE(16, 24, num_experts=4, top_k=top_k, capacity_factor=capacity_factor, expert_dropout=0.3).train()
    x, grad = torch.randn(2, 37, 16), torch.randn(2, 37, 16)
    with kernels.enabled_only(False):
        reference = _run(layer, x, grad, 'grouped_mm')
        out, x_grad, grads, *_ = _run(layer, x, grad, 'triton')
    assert not torch.equal(reference[0], _run(layer.eval(), x, grad, 'grouped_mm')[0])  # dropout acted
    torch.testing.assert_close(out, reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_grad, reference[1], atol=1e-5, rtol=1e-5)
    for name, value in grads.items():
        torch.testing.assert_close(value, reference[2][name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_fused_path_is_never_chosen_unpinned_and_says_where_it_cannot_run(pinned, monkeypatch):
    """A kernel becomes a default only after a GPU measures it faster: unpinned, CPU tokens take another path; pinned
    without CUDA or the interpreter, it is one clear error."""
    from gcvimoe.moe import backends
    assert backends.choose_expert_backend(torch.randn(4, 8), MoE(8, 16, num_experts=2).experts) is not backends.EXPERT_BACKENDS["triton"]
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    set_expert_path('triton')
    with pytest.raises(GcvimoeError, match="expert path 'triton' cannot run cpu tokens"):
        MoE(8, 16, num_experts=2)(torch.randn(4, 8))
