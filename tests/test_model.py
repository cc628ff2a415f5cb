"""GCViMoE: experts inside GC ViT, as a timm model."""
import json
import subprocess
import sys

import pytest
import timm
import torch

from gcvimoe.errors import GcvimoeError
from gcvimoe.models import VARIANTS, create_model, resolve_moe_blocks
from gcvimoe.models import create_model_from_checkpoint, load_weights, save_model, upcycle
from gcvimoe.models.blocks import GlobalContextVitBlock
from gcvimoe.models.windows import WindowLayout
from gcvimoe.moe import MoE, moe_layers


# the big variants run the same code with wider layers; they only cost time (make test-slow runs them)
_BIG = ('tiny2', 'small', 'small2', 'base', 'large')


@pytest.mark.parametrize('size', [pytest.param(s, marks=pytest.mark.slow) if s in _BIG else s for s in VARIANTS])
def test_every_variant_as_a_timm_model(size, tmp_path):
    small_images = size in ('pico', 'nano')  # built for 32 px grey images by default
    in_chans = 1 if small_images else 3
    model = timm.create_model(f'gcvimoe_{size}', num_classes=5, img_size=None if small_images else 32)
    layers = dict(moe_layers(model))
    # pico: every other block of its 4 stages (2, 2, 4, 2 blocks); the others: Swin-MoE's stage 3 odd blocks + 1
    assert len(layers) == (5 if size == 'pico' else len(range(1, VARIANTS[size]['depths'][2], 2)) + 1)
    assert all(layer.num_experts == 8 and layer.top_k == 1 for layer in layers.values())

    x = torch.randn(2, in_chans, 32, 32)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    (out.logsumexp(-1).sum() + model.moe_report().aux_loss).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in layers:
        assert grads[f'{name}.router.weight'].abs().sum() > 0, name
    for name, grad in grads.items():
        if '.attn.' in name or 'norm' in name:
            assert grad is not None, name
            stage = model.stages[int(name.split('.')[1])] if name.startswith('stages.') else None
            if 'rel_pos' in name and stage.last_layout.tokens_per_window == 1:
                continue  # attention over a single key: the softmax is 1 whatever the bias
            assert grad.abs().sum() > 0, name

    features = timm.create_model(f'gcvimoe_{size}', features_only=True, out_indices=(2, 3), img_size=32)
    assert [f.shape[1] for f in features(x)] == features.feature_info.channels()

    model.reset_classifier(3)
    assert model(x).shape == (2, 3)

    model.eval()
    path = save_model(model, tmp_path / 'model.safetensors')
    loaded = create_model_from_checkpoint(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_moe_block_keeps_attention_residual():
    """x + attn(norm1(x)), then + moe(norm2(.)): the original project added the MoE output to the pre-attention x."""
    block = GlobalContextVitBlock(16, 2, (4, 4), mlp_ratio=2, use_global=False,
                                  moe_kwargs=dict(num_experts=4, capacity_factor=0.)).eval()
    assert isinstance(block.mlp, MoE)
    x = torch.randn(2, 16, 4, 4)
    layout = WindowLayout((4, 4), (4, 4), x.device)
    tokens = layout.partition(x).contiguous()
    tokens_before = tokens.clone()
    with torch.no_grad():
        actual = block(tokens, None, layout)
        assert torch.equal(tokens, tokens_before)  # without autograd the block works in place, but not on its input
        after_attn = tokens + block.attn(block.norm1(tokens).view(2, 16, 16), None, (4, 4)).view(2, 16, 16)
        expected = after_attn + block.mlp(block.norm2(after_attn))
        buggy = tokens + block.mlp(block.norm2(after_attn))
    torch.testing.assert_close(actual, expected)
    assert not torch.allclose(actual, buggy)


@pytest.mark.parametrize('num_experts', [0, 4])
@pytest.mark.parametrize('img_size', [64, 72], ids=['whole-windows', 'padded-windows'])
def test_inference_path_equals_autograd_path(num_experts, img_size):
    """Without autograd a block adds its branches into the residual in place, inside the projection GEMMs and with
    the layer scale folded into the weights; the result must be the autograd path's and the input must not change."""
    model = create_model('gcvimoe_xxtiny', num_classes=10, img_size=64, num_experts=num_experts, layer_scale=1.,
                         capacity_factor=0.).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('gamma'):  # layer scales: random, so that folding them in is checked
                param.normal_()
    x = torch.randn(2, 3, img_size, img_size)
    x_before = x.clone()
    expected = model(x)  # grad enabled: the plain path
    with torch.inference_mode():
        actual = model(x)
    assert sum(name.endswith('gamma') for name, _ in model.named_parameters()) > 0
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before)


def test_bf16_autocast_inference_stays_close_to_fp32():
    model = create_model('gcvimoe_xxtiny', num_classes=10, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            actual = model(x)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.float(), expected, rtol=0.1, atol=0.1)


def test_aux_loss_is_summed_over_all_moe_layers():
    model = create_model('gcvimoe_nano', num_classes=10, num_experts=4, z_loss_weight=1e-3).train()
    model(torch.randn(8, 1, 32, 32))
    layers = dict(moe_layers(model))
    assert list(layers) == ['stages.2.blocks.1.mlp', 'stages.2.blocks.3.mlp', 'stages.2.blocks.5.mlp',
                            'stages.3.blocks.1.mlp']
    per_layer = torch.stack([layer.aux_loss for layer in layers.values()])
    assert (per_layer > 0).all() and len(set(per_layer.tolist())) == len(layers)
    report = model.moe_report()
    torch.testing.assert_close(report.aux_loss, per_layer.sum())
    assert set(report.stats) == set(layers)


def test_eval_prediction_does_not_depend_on_the_batch():
    model = create_model('gcvimoe_nano', num_classes=10).eval()  # default: capacity 1.25 in training, dropless eval
    images = torch.randn(33, 1, 32, 32)
    with torch.no_grad():
        alone = model(images[:1])
        in_batch = model(images)[:1]
    torch.testing.assert_close(alone, in_batch, rtol=1e-5, atol=1e-5)


def test_upcycled_top2_dropless_equals_dense():
    dense = create_model('gcvimoe_xxtiny', num_experts=0, num_classes=10).eval()
    moe = upcycle('gcvimoe_xxtiny', dense.state_dict(), num_classes=10, num_experts=4, top_k=2,
                  normalize_gates=True, capacity_factor=0., eval_capacity_factor=0.).eval()
    assert len(list(moe_layers(moe))) == 4
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=0, atol=1e-5)


def test_upcycle_from_timm_checkpoint_with_noise(tmp_path):
    ref = timm.create_model('gcvit_xxtiny', num_classes=10)
    torch.save(ref.state_dict(), tmp_path / 'dense.pth')
    out = tmp_path / 'moe.safetensors'
    result = subprocess.run([sys.executable, '-m', 'gcvimoe', 'convert', 'upcycle', '--model', 'gcvimoe_xxtiny',
                             '--checkpoint', str(tmp_path / 'dense.pth'), '--num-experts', '4', '--noise-std', '0.01',
                             '--output', str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model = create_model_from_checkpoint(out)
    layer = model.get_submodule('stages.2.blocks.1.mlp')
    dense_fc1 = ref.stages[2].blocks[1].mlp.fc1.weight.T
    for e in range(4):
        diff = (layer.experts.fc1_weight[e] - dense_fc1).detach()
        assert 0 < diff.std() < 0.02  # a noisy copy of the dense MLP, not a fresh init


def test_info_reports_active_macs_close_to_dense(capsys):
    from gcvimoe.cli import main
    assert main(['info', '--model', 'gcvimoe_tiny', '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    dense_timm = timm.create_model('gcvit_tiny', device='meta')
    from gcvimoe.models.info import count_macs
    timm_macs = count_macs(dense_timm, (3, 224, 224))
    assert info['num_moe_layers'] == 10 and info['num_experts'] == 8
    assert info['total_params'] > 2 * info['active_params'] > 0
    assert abs(info['macs'] / timm_macs - 1) < 0.03
    assert info['macs'] > info['dense_macs']  # the routers cost a little


def test_info_text_output():
    result = subprocess.run([sys.executable, '-m', 'gcvimoe', 'info', '--model', 'gcvimoe_nano', '--num-experts', '8'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'M total' in result.stdout and 'M active' in result.stdout and 'MACs' in result.stdout
    assert '4 x 8 experts' in result.stdout


def test_routing_maps_follow_the_feature_map():
    model = create_model('gcvimoe_xxtiny', num_classes=10, num_experts=4).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 200, 200))  # stage 3 map 13x13 in 14x14 windows: no padding; stage 1 is padded
    maps = model.routing_maps()
    assert set(maps) == {name for name, _ in moe_layers(model)}
    assert maps['stages.2.blocks.1.mlp'].shape == (2, 13, 13)
    assert maps['stages.3.blocks.1.mlp'].shape == (2, 7, 7)
    assert all(((m >= 0) & (m < 4)).all() for m in maps.values())


@pytest.mark.parametrize('spec, expected', [
    (None, [[], [], [1, 3, 5], [1]]),
    ([[-1], [-1], [1, 3, 5], [1]], [[], [], [1, 3, 5], [1]]),
    ('every 2nd block of stages 3-4', [[], [], [1, 3, 5], [1]]),
    ('every block of stage 4', [[], [], [], [0, 1]]),
    ('every other block in stages 2-3', [[], [1], [1, 3, 5], []]),
    ('last 3 blocks', [[], [], [5], [0, 1]]),
    ('last 2 odd blocks', [[], [], [5], [1]]),
    ('all', [[0, 1], [0, 1], list(range(6)), [0, 1]]),
    ('none', [[], [], [], []]),
])
def test_moe_block_placements(spec, expected):
    assert resolve_moe_blocks(spec, (2, 2, 6, 2)) == expected


def test_pico_puts_experts_in_every_stage_and_swin_pico_files_still_load(tmp_path):
    """gcvimoe_pico's own placement is every other block of every stage, and a model built or saved with an explicit
    placement (earlier pico files say 'swin') keeps it, so its weights load into the same layers."""
    model = create_model('gcvimoe_pico', num_classes=10)
    assert sorted(name for name, _ in moe_layers(model)) == [
        'stages.0.blocks.1.mlp', 'stages.1.blocks.1.mlp', 'stages.2.blocks.1.mlp', 'stages.2.blocks.3.mlp',
        'stages.3.blocks.1.mlp']
    assert model.model_args['moe']['moe_blocks'] == 'every 2nd block of stages 1-4'  # saved as chosen, not null
    assert create_model('gcvimoe_nano', num_classes=10).moe_blocks == [[], [], [1, 3, 5], [1]]

    torch.manual_seed(0)
    swin = create_model('gcvimoe_pico', num_classes=10, moe_blocks='swin').eval()
    assert sorted(name for name, _ in moe_layers(swin)) == ['stages.2.blocks.1.mlp', 'stages.2.blocks.3.mlp',
                                                           'stages.3.blocks.1.mlp']
    loaded = create_model_from_checkpoint(save_model(swin, tmp_path / 'swin.safetensors')).eval()
    assert loaded.moe_blocks == swin.moe_blocks
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), swin(x), rtol=0, atol=0)
    with pytest.raises(GcvimoeError, match='MoE layers at'):  # the same weights do not fit the new placement
        load_weights(model, swin.state_dict())


def test_placement_errors_name_both_sides():
    with pytest.raises(GcvimoeError, match='block 7 of stage 2.*has 6 blocks'):
        resolve_moe_blocks([[-1], [-1], [1, 7], [1]], (2, 2, 6, 2))
    with pytest.raises(GcvimoeError, match='not a placement'):
        resolve_moe_blocks('sometimes', (2, 2, 6, 2))
    with pytest.raises(GcvimoeError, match='4 stages'):
        resolve_moe_blocks([[1], [1]], (2, 2, 6, 2))


def test_checkpoint_of_another_expert_count_or_variant(tmp_path):
    four = create_model('gcvimoe_nano', num_classes=10, num_experts=4)
    eight = create_model('gcvimoe_nano', num_classes=10, num_experts=8)
    with pytest.raises(GcvimoeError, match='4 experts.*has 8.*num_experts=4'):
        load_weights(eight, four.state_dict())
    tiny = create_model('gcvimoe_xxtiny', num_classes=10, num_experts=4)
    with pytest.raises(GcvimoeError, match='does not fit gcvimoe_nano.*shape mismatches'):
        load_weights(four, tiny.state_dict())
    dense = create_model('gcvimoe_nano', num_classes=10, num_experts=0)
    with pytest.raises(GcvimoeError, match='MoE layers at none but the model at'):
        load_weights(four, dense.state_dict())


def test_grad_checkpointing_with_expert_dropout_gives_the_same_gradients():
    """Non-reentrant checkpointing recomputes every block (MoE layers with expert dropout included) in backward and
    needs the same tensors saved both times, and the same dropout masks (it restores the random state)."""
    model = timm.create_model('gcvimoe_nano', num_classes=4, expert_dropout=0.3).train()
    x = torch.randn(2, 1, 32, 32)
    grads = []
    for checkpointing in (True, False):  # checkpointed first: a fresh model, nothing cached from a plain pass
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(0)
        (model(x).sum() + sum(layer.aux_loss for _, layer in moe_layers(model))).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize('name', ['gcvimoe_nano', 'gcvimoe_xxtiny'])
def test_gradients_have_their_parameters_strides(name):
    """DDP lays its gradient buckets out like the parameters; a gradient of other strides costs a copy per step and a
    'grad strides do not match bucket view strides' warning."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **({'img_size': 64} if name == 'gcvimoe_xxtiny' else {}))
    model(torch.randn(2, model.in_chans, *model.img_size)).sum().backward()
    mismatched = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert mismatched == []


def test_dense_model_traces_with_torch_fx_as_timm_gcvit_does():
    """timm's fx feature extraction (symbolic tracing) works on the dense model, as on timm's gcvit_xxtiny."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    model = create_model('gcvimoe_xxtiny', num_experts=0).eval()
    _, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes={eval_nodes[-1]: 'logits', 'stages.2': 'stage3'})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = extractor(x)
        torch.testing.assert_close(features['logits'], model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(features['stage3'], model.stages[:3](model.stem(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('num_experts', [0, 4])
def test_vit_weight_init_is_timm_gcvit_init_with_experts_as_linear_layers(num_experts):
    """weight_init='vit': every linear weight (each expert's included) is Xavier-uniform as in timm's
    GlobalContextVit; the same architecture built by timm has the same per-layer spread."""
    from timm.models.gcvit import GlobalContextVit as TimmGcVit

    arch = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), img_size=32, window_size=8, in_chans=1,
                num_classes=10)
    torch.manual_seed(0)
    ours = create_model('gcvimoe_xxtiny', weight_init='vit', num_experts=num_experts, **arch)
    reference = TimmGcVit(**{**arch, 'window_size': (8, 4, 2, 1)}, weight_init='vit')
    reference_std = {name: m.weight.std().item() for name, m in reference.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    checked = compared = 0
    for name, module in ours.named_modules():
        if isinstance(module, torch.nn.Linear) and 'gate' not in name:
            weights = [module.weight.t()]
        elif isinstance(module, MoE):
            weights = [*module.experts.fc1_weight, *module.experts.fc2_weight]
        else:
            continue
        for weight in weights:  # [fan_in, fan_out]
            bound = (6 / sum(weight.shape)) ** 0.5
            assert weight.abs().max() <= bound
            assert weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.15), name
            checked += 1
        twin = name if name in reference_std else name + '.fc1'  # an MoE layer: the MLP it replaces in timm's
        if twin in reference_std:
            assert weights[0].std().item() == pytest.approx(reference_std[twin], rel=0.15), name
            compared += 1
    assert checked > 10 and compared > 10
    normal = create_model('gcvimoe_xxtiny', num_experts=0, **arch)
    assert normal.stages[0].blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.15)
    with pytest.raises(ValueError, match="weight_init"):
        create_model('gcvimoe_xxtiny', weight_init='xavier', **arch)
