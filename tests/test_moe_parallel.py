"""Expert parallelism over 2 gloo processes gives the single-process layer's outputs and gradients."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gcvimoe.moe import MoE
from gcvimoe.moe.parallel import (
    ExpertParallelExperts, gather_expert_optimizer_state, gather_expert_state_dict, is_expert_parallel,
    shard_expert_optimizer_state, shard_expert_state_dict, shard_experts_, whole_model_parameters,
)

WORLD_SIZE = 2
CASES = [
    dict(num_experts=4, top_k=2, capacity_factor=0.0),  # dropless, variable splits
    dict(num_experts=4, top_k=1, capacity_factor=0.5, batch_priority=True),  # drops
    dict(num_experts=2, top_k=1, capacity_factor=0.0, shared_expert=True),  # one expert per process
]


def _batches():
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 7, 8, generator=generator) for _ in range(WORLD_SIZE)]
    grads = [torch.randn(3, 7, 8, generator=generator) for _ in range(WORLD_SIZE)]
    return inputs, grads


def _check_case(rank, options):
    torch.manual_seed(0)
    reference = MoE(8, 16, **options)
    inputs, grads = _batches()
    # the single-process layer on every process's batch; expert gradients add up over the batches
    local_reference = copy.deepcopy(reference)
    reference_outputs = []
    for x, grad in zip(inputs, grads):
        out = reference(x)
        out.backward(grad)
        reference_outputs.append(out.detach())
    x_reference = inputs[rank].clone().requires_grad_()
    local_reference(x_reference).backward(grads[rank])

    parallel = shard_experts_(copy.deepcopy(local_reference))
    parallel.zero_grad()
    assert isinstance(parallel.experts, ExpertParallelExperts)
    assert parallel.experts.num_experts == options['num_experts'] // WORLD_SIZE
    # a header counts the whole layer, not this process's share
    assert whole_model_parameters(parallel) == sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in parallel.parameters()) < sum(p.numel() for p in reference.parameters())
    x = inputs[rank].clone().requires_grad_()
    out = parallel(x)
    out.backward(grads[rank])

    torch.testing.assert_close(out, reference_outputs[rank])
    torch.testing.assert_close(x.grad, x_reference.grad)
    torch.testing.assert_close(parallel.router.weight.grad, local_reference.router.weight.grad)
    local = slice(parallel.experts.first_expert, parallel.experts.first_expert + parallel.experts.num_experts)
    for name in ('fc1_weight', 'fc1_bias', 'fc2_weight', 'fc2_bias'):
        torch.testing.assert_close(getattr(parallel.experts, name).grad, getattr(reference.experts, name).grad[local])
    torch.testing.assert_close(parallel.stats.kept_tokens_per_expert, local_reference.stats.kept_tokens_per_expert)

    # checkpoints: gathered state is the full single-process state, and a shard of it loads back
    full = gather_expert_state_dict(parallel.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(full[key], value)
    fresh = shard_experts_(MoE(8, 16, **options))
    fresh.load_state_dict(shard_expert_state_dict(full, rank, WORLD_SIZE))
    torch.testing.assert_close(fresh(inputs[rank]), reference_outputs[rank])
    assert is_expert_parallel(fresh) and not is_expert_parallel(reference)
    _check_optimizer_state(parallel, reference, rank)


def _check_optimizer_state(parallel, reference, rank):
    """Adam's moments and Adafactor's factored statistics of the expert weights gather into the single-process
    optimiser's state and shard back; Adafactor's statistics of the stacked biases mix the experts and refuse."""
    param_names = [name for name, _ in reference.named_parameters()]
    experts = [index for index, name in enumerate(param_names) if name.startswith('experts.')]
    expert_weights = [index for index in experts if param_names[index].endswith('_weight')]

    def optimizers(optimizer_class, indices):
        # the reference's expert gradients sum both batches, the shards' the same tokens: one step agrees
        pairs = []
        for model in (parallel, reference):
            params = list(model.parameters())
            optimizer = optimizer_class([params[index] for index in indices], lr=0.1)
            optimizer.step()
            pairs.append(optimizer)
        return pairs

    all_params = list(range(len(param_names)))
    for optimizer_class, indices in ((torch.optim.Adam, all_params), (torch.optim.Adafactor, expert_weights)):
        ours, single = optimizers(optimizer_class, indices)
        full, expected, own = gather_expert_optimizer_state(ours), single.state_dict(), ours.state_dict()
        local = shard_expert_optimizer_state(expected, ours, rank, WORLD_SIZE)
        for position, index in enumerate(indices):
            if index not in experts:
                continue
            moments = [key for key, value in expected['state'][position].items() if value.dim()]
            assert moments, optimizer_class  # Adam: exp_avg, exp_avg_sq; Adafactor: row_var, col_var
            for key in moments:
                torch.testing.assert_close(full['state'][position][key], expected['state'][position][key])
                torch.testing.assert_close(local['state'][position][key], own['state'][position][key])
                # gathering left the live state alone
                assert own['state'][position][key].shape[0] == parallel.experts.num_experts
    if parallel.experts.num_experts > 1:  # (with one expert per process a [1, h] statistic is that expert's own)
        ours, _ = optimizers(torch.optim.Adafactor, [param_names.index('experts.fc1_bias')])
        with pytest.raises(ValueError, match='not one row per expert'):
            gather_expert_optimizer_state(ours)


def _worker(rank, init_file):
    torch.set_num_threads(1)  # the forked children share the parent's cores
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD_SIZE)
    try:
        for options in CASES:
            _check_case(rank, options)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not available')
def test_expert_parallel_matches_single_process(tmp_path):
    # fork keeps the start-up to a fraction of a second; the children only use torch after setting one thread
    mp.start_processes(_worker, args=(str(tmp_path / 'store'),), nprocs=WORLD_SIZE, start_method='spawn')


def test_shard_state_dict_slices_experts_only():
    state = MoE(8, 16, num_experts=4, shared_expert=True).state_dict()
    shard = shard_expert_state_dict(state, rank=1, world_size=2)
    torch.testing.assert_close(shard['experts.fc1_weight'], state['experts.fc1_weight'][2:4])
    torch.testing.assert_close(shard['shared_expert.fc1.weight'], state['shared_expert.fc1.weight'])
    torch.testing.assert_close(shard['router.weight'], state['router.weight'])
    with pytest.raises(ValueError, match='not divisible by 3 processes'):
        shard_expert_state_dict(state, rank=0, world_size=3)
