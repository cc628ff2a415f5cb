"""torch.compile: the MoE layer and whole models compile into one graph (fullgraph=True), equal eager, and routing
changes between batches cause no recompilation.

Eager references run with the kernels off: the compiled graph takes the plain path (the CPU kernels are opaque
autograd nodes with routing-dependent chunking, for eager runs only).
"""
import pytest
import torch

import gcvimoe
from gcvimoe import kernels
from gcvimoe.moe import MoE, collect_aux_loss
from gcvimoe.train import Callback

ROUTERS = ("linear", "cosine", "expert_choice")


def _layer(router: str, capacity_factor: float, train: bool) -> MoE:
    torch.manual_seed(0)
    top_k = 1 if router == "expert_choice" else 2
    layer = MoE(8, 16, num_experts=4, top_k=top_k, router=router, capacity_factor=capacity_factor,
                eval_capacity_factor=capacity_factor, normalize_gates=top_k > 1)
    return layer.train(train)


def _run(module, x, params):
    out = module(x)
    loss = out.square().sum() + (collect_aux_loss(module) if torch.is_grad_enabled() else 0)
    return out.detach(), torch.autograd.grad(loss, [x, *params])


def _assert_equal_runs(compiled, eager, grad_rtol=1e-5):
    """Outputs and gradients of two :func:`_run` results agree."""
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, expected, rtol=grad_rtol, atol=1e-5)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.0], ids=["capacity", "dropless"])
@pytest.mark.parametrize("router", ROUTERS)
def test_moe_layer_compiles_fullgraph_and_equals_eager(router, capacity_factor, train):
    layer = _layer(router, capacity_factor, train)
    x = torch.randn(2, 12, 8, requires_grad=True)
    params = list(layer.parameters())
    torch._dynamo.reset()
    compiled = _run(torch.compile(layer, fullgraph=True, backend="aot_eager"), x, params)
    with kernels.enabled_only(False):
        eager = _run(layer, x, params)
    _assert_equal_runs(compiled, eager)
    if capacity_factor and router != "expert_choice":  # (expert choice never drops)
        assert layer.stats.dropped_fraction > 0  # the case exercises the tail of dropped assignments


def test_moe_layer_compiles_with_inductor():
    layer = _layer("linear", 1.0, True)
    x = torch.randn(2, 12, 8, requires_grad=True)
    params = list(layer.parameters())
    torch._dynamo.reset()
    compiled = _run(torch.compile(layer, fullgraph=True), x, params)
    with kernels.enabled_only(False):
        eager = _run(layer, x, params)
    _assert_equal_runs(compiled, eager, grad_rtol=1e-4)


def test_compiled_layer_routes_where_dynamo_reads_is_exporting_as_true(monkeypatch):
    """Before pytorch/pytorch#176499, dynamo replaced ``torch.compiler.is_exporting()`` by True inside every trace,
    ``torch.compile`` included. The patch gives this torch that behaviour. The compiled layer must still dispatch
    (drops at capacity 1, routing statistics), not take the export path (dropless, every expert, no statistics)."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    layer = _layer("linear", 1.0, True)
    x = torch.randn(2, 12, 8, requires_grad=True)
    params = list(layer.parameters())
    torch._dynamo.reset()
    compiled = _run(torch.compile(layer, fullgraph=True, backend="aot_eager"), x, params)
    assert layer.stats is not None and layer.stats.dropped_fraction > 0
    with kernels.enabled_only(False):
        eager = _run(layer, x, params)
    _assert_equal_runs(compiled, eager)


@pytest.mark.parametrize("path", [None, "grouped_mm", "triton"], ids=["default", "gpu-path", "triton"])
def test_new_routing_does_not_recompile(path):
    """Three batches that route differently (different token counts per expert and drops) run one graph, on the
    default path, on the GPU's (in bf16, which its grouped GEMM traces in) and on the fused Triton kernels."""
    from gcvimoe.moe import set_expert_path
    if path == "triton":
        pytest.importorskip("triton")
    dtype = torch.bfloat16 if path == "grouped_mm" else torch.float32
    layer = _layer("linear", 1.0, True).to(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    counts = []
    previous = set_expert_path(path)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in range(3):
                torch.manual_seed(seed)
                compiled(torch.randn(2, 12, 8, dtype=dtype) * (seed + 1)).sum().backward()
                counts.append(layer.stats.kept_tokens_per_expert.tolist())
    finally:
        set_expert_path(previous)
    assert len({tuple(c) for c in counts}) == 3  # the routing did change


# xxtiny runs nano's code with wider layers and more blocks; it only costs time (make test-slow runs it)
@pytest.mark.parametrize("name", ["gcvimoe_nano", pytest.param("gcvimoe_xxtiny", marks=pytest.mark.slow)])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_models_compile_fullgraph_and_equal_eager(name, train):
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, expert_dropout=0.0)
    if name == "gcvimoe_xxtiny":
        kwargs.update(img_size=64, num_experts=4)
    model = gcvimoe.create_model(name, **kwargs).train(train)
    x = torch.randn(2, model.in_chans, *model.img_size)
    params = [p for p in model.parameters() if p.requires_grad]
    torch._dynamo.reset()
    with torch.set_grad_enabled(train):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    compiled_grads = torch.autograd.grad(compiled.square().sum() + collect_aux_loss(model), params) if train else ()
    with kernels.enabled_only(False), torch.set_grad_enabled(train):
        eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum() + collect_aux_loss(model), params) if train else ()
    torch.testing.assert_close(compiled.detach(), eager.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class _StepLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, run, epoch, batch_idx, record):
        self.losses.append(record["loss"])


def test_train_compile_matches_the_eager_run(tmp_path):
    """`train --compile` on digits: the first step's loss equals the eager run's, the final top-1 is within 2 points.

    No dropout, so that the compiled and the eager run draw no random numbers in the model."""
    from gcvimoe.train import build_config, train

    results = {}
    for compiled in (False, True):
        cfg = build_config("digits", {
            "epochs": 1, "warmup_epochs": 0, "batch_size": 256, "compile": compiled, "drop_path_rate": 0.0,
            "moe": {"num_experts": 4, "expert_dropout": 0.0},
            "model_kwargs": {"embed_dim": 8, "depths": [1, 1, 2, 2], "num_heads": [1, 1, 2, 2]},
            "output": str(tmp_path / f"compiled-{compiled}")})
        recorder = _StepLosses()
        torch._dynamo.reset()
        result = train(cfg, callbacks=[recorder])
        results[compiled] = recorder.losses, result.history[-1]["eval_top1"]
    (eager_losses, eager_top1), (compiled_losses, compiled_top1) = results[False], results[True]
    assert abs(compiled_losses[0] - eager_losses[0]) < 1e-5
    assert abs(compiled_top1 - eager_top1) <= 2.0


@pytest.fixture
def gpu_path():
    """The GPU's expert path (two grouped GEMMs between two gathers), run on the CPU; it traces in half precision
    only (the grouped GEMM's shape function wants bf16 or fp16, as the GPU kernel does)."""
    from gcvimoe.moe import set_expert_path
    previous = set_expert_path("grouped_mm")
    yield torch.bfloat16
    set_expert_path(previous)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.0], ids=["capacity", "dropless"])
@pytest.mark.parametrize("router", ROUTERS)
def test_gpu_path_compiles_fullgraph_and_equals_eager(gpu_path, router, capacity_factor, train):
    layer = _layer(router, capacity_factor, train).to(gpu_path)
    x = torch.randn(2, 12, 8, dtype=gpu_path, requires_grad=True)
    params = list(layer.parameters())
    torch._dynamo.reset()
    compiled = _run(torch.compile(layer, fullgraph=True, backend="aot_eager"), x, params)
    eager = _run(layer, x, params)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    for got, expected in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.0], ids=["capacity", "dropless"])
@pytest.mark.parametrize("router", ROUTERS)
def test_fused_path_compiles_fullgraph_and_equals_eager(router, capacity_factor, train):
    """The Triton kernels are custom operators: one graph holds them, with the same results as eager."""
    from gcvimoe.moe import set_expert_path
    pytest.importorskip("triton")
    previous = set_expert_path("triton")
    try:
        layer = _layer(router, capacity_factor, train)
        x = torch.randn(2, 12, 8, requires_grad=True)
        params = list(layer.parameters())
        torch._dynamo.reset()
        compiled = _run(torch.compile(layer, fullgraph=True, backend="aot_eager"), x, params)
        eager = _run(layer, x, params)
    finally:
        set_expert_path(previous)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    for got, expected in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_on_the_gpu_path_compiles_fullgraph_and_equals_eager(gpu_path, train):
    """gcvimoe_nano in bf16 on the GPU's expert path: one graph, the same outputs and gradients as eager."""
    torch.manual_seed(0)
    model = gcvimoe.create_model("gcvimoe_nano", num_classes=10, expert_dropout=0.0).to(gpu_path).train(train)
    x = torch.randn(4, model.in_chans, *model.img_size, dtype=gpu_path)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for compiled in (True, False):
        torch._dynamo.reset()
        forward = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        with kernels.enabled_only(False), torch.set_grad_enabled(train):  # the attention's plain path in both
            out = forward(x)
        grads = torch.autograd.grad(out.float().square().sum() + collect_aux_loss(model), params) if train else ()
        results.append((out, grads))
    (compiled_out, compiled_grads), (eager_out, eager_grads) = results
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=0)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_regional_compilation_compiles_each_block_and_equals_eager():
    """`--compile regional`: every block is its own graph (blocks of one shape share it), the model equals eager."""
    from gcvimoe.train import build_config
    from gcvimoe.train.config import parse_cli_value
    torch.manual_seed(0)
    model = gcvimoe.create_model("gcvimoe_nano", num_classes=10, expert_dropout=0.0)
    x = torch.randn(2, model.in_chans, *model.img_size)
    with kernels.enabled_only(False):
        eager = model(x)
        torch._dynamo.reset()
        model.compile_blocks(backend="aot_eager")
        compiled = model(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    blocks = [block for stage in model.stages for block in stage.blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert build_config(None, {"compile": parse_cli_value("compile", "regional")}).compile == "regional"
    assert build_config(None, {"compile": parse_cli_value("compile", "true")}).compile is True
    with pytest.raises(gcvimoe.errors.GcvimoeError, match="config key 'compile' must be one of"):
        build_config(None, {"compile": "partial"})
