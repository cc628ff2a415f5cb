"""The places where features are added, each proven by a toy registered in a few lines: a router (by name in a layer
and in a model) and a scalar sink (fed by a normal training run). The dataset-source seam is tested in
test_sources.py, the expert-backend seam in test_expert_paths.py."""
import pytest
import torch

import gcvimoe
from gcvimoe.errors import GcvimoeError
from gcvimoe.moe import MoE, RouterSpec, Routing, moe_layers, register_router
from gcvimoe.moe.router import ROUTERS, LinearRouter
from gcvimoe.train import build_config, train
from gcvimoe.train import sinks
from gcvimoe.train.sinks import ScalarSink, register_sink
from helpers import make_image_folder


@pytest.fixture
def toy_router():
    """A router that sends every token to expert 0 with gate 1 (registered in the lines between the markers)."""
    # --- the toy router: 10 lines
    def to_expert_zero(logits, options, capacity, training):
        tokens = logits.shape[0]
        zeros = torch.zeros(tokens, dtype=torch.long, device=logits.device)
        probs = logits.softmax(-1)
        return Routing(logits, probs, expert_index=zeros, gates=torch.ones_like(probs[:, 0]), top1_expert=zeros,
                       top1_prob=probs[:, 0].detach())

    register_router('toy', RouterSpec(LinearRouter, to_expert_zero))
    # ---
    yield 'toy'
    del ROUTERS['toy']


def expert_zero(experts, x):
    """Expert 0's MLP on every token of ``x`` ``[..., d]``, by hand."""
    hidden = experts.act(x @ experts.fc1_weight[0] + experts.fc1_bias[0])
    return hidden @ experts.fc2_weight[0] + experts.fc2_bias[0]


def test_a_registered_router_is_used_by_name_in_a_layer(toy_router):
    layer = MoE(8, 16, num_experts=4, router=toy_router, capacity_factor=0.0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, expert_zero(layer.experts, x))
    assert layer.stats.tokens_per_expert.tolist() == [10, 0, 0, 0]
    out.sum().backward()  # the gradient reaches expert 0 only
    assert layer.experts.fc1_weight.grad[0].abs().sum() > 0 and not layer.experts.fc1_weight.grad[1:].any()


def test_a_registered_router_is_used_by_name_in_a_model(toy_router):
    model = gcvimoe.create_model('gcvimoe_nano', num_classes=3, img_size=32, num_experts=4, router=toy_router,
                                 capacity_factor=0.0, embed_dim=16).eval()
    layers = dict(moe_layers(model))
    assert layers and all(layer.config.router == toy_router for layer in layers.values())
    seen = {}
    hooks = [layer.register_forward_hook(lambda module, args, out, name=name: seen.update({name: (args[0], out)}))
             for name, layer in layers.items()]
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32))
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(layers)
    for name, (x, out) in seen.items():
        torch.testing.assert_close(out, expert_zero(layers[name].experts, x))


def test_an_unregistered_router_name_is_refused():
    with pytest.raises(GcvimoeError, match="router must be one of"):
        MoE(8, 16, num_experts=4, router='toy')


@pytest.fixture
def registry(monkeypatch):
    """The sink registry, restored after the test."""
    monkeypatch.setattr(sinks, "SINKS", dict(sinks.SINKS))


@pytest.mark.usefixtures("registry", "one_thread")
def test_a_registered_sink_receives_the_runs_scalars(tmp_path):
    # --- the toy sink: 12 lines
    @register_sink
    class Recorder(ScalarSink):
        name = "recorder"
        records, closed = [], []

        @classmethod
        def open(cls, output_dir, cfg, purge_step):
            return cls()

        def add(self, axis, step, scalars):
            self.records.append((axis, step, dict(scalars)))

        def close(self):
            self.closed.append(True)
    # ---
    data_dir = make_image_folder(tmp_path / "images", val_per_class=2, classes=("circle", "stripes"))
    cfg = build_config(None, {"model": "gcvimoe_nano", "model_kwargs": {"embed_dim": 16}, "moe": {"num_experts": 4},
                              "img_size": 32, "batch_size": 2, "epochs": 2, "warmup_epochs": 1, "lr": 1e-3,
                              "log_interval": 2, "tensorboard": False, "data_dir": str(data_dir),
                              "output": str(tmp_path / "run")})
    result = train(cfg)
    assert Recorder.closed == [True]
    steps = [step for axis, step, _ in Recorder.records if axis == "step"]
    assert steps == [epoch * 6 + step for epoch in range(2) for step in (1, 2, 4, 6)]  # 6 micro-batches per epoch
    epochs = {}
    for axis, step, scalars in Recorder.records:
        assert all(tag.startswith(f"{axis}/") for tag in scalars)
        if axis == "epoch":
            epochs.setdefault(step, {}).update(scalars)
    assert sorted(epochs) == [1, 2]
    for row in result.history:
        scalars = epochs[row["epoch"]]
        for column in ("train_loss", "eval_loss", "eval_top1", "lr"):
            assert scalars[f"epoch/{column}"] == pytest.approx(row[column], rel=1e-6), column
        assert any(tag.startswith("epoch/eval_experts/") and tag.endswith("/load_cv") for tag in scalars)
