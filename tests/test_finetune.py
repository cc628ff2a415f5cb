"""Starting from weights: ``--initial-checkpoint`` without ``-c`` picks the fine-tune recipe and the variant the
weights hold, and says so in the header; layer-wise LR decay follows timm's ``--layer-decay``."""
import pytest
import torch
import yaml

from gcvimoe.models import create_model, variant_of
from gcvimoe.train.build import _create_optimizer
from gcvimoe.train.config import build_config
from helpers import cli, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense_nano_file(tmp_path_factory):
    """A plain state dict (no model name) of a dense gcvimoe_nano with 5 classes, as a timm user would save one."""
    path = tmp_path_factory.mktemp("weights") / "nano_dense.pth"
    torch.save(create_model("gcvimoe_nano", num_experts=0, num_classes=5, in_chans=3).state_dict(), path)
    return path


def _printed_config(capsys, *argv):
    code, out, err = cli(capsys, "train", *argv, "--print-config")
    assert code == 0, err
    return yaml.safe_load(out)


def test_initial_checkpoint_without_c_picks_the_finetune_recipe(dense_nano_file, capsys):
    finetune = _printed_config(capsys, "--initial-checkpoint", str(dense_nano_file))
    assert (finetune["lr"], finetune["layer_decay"], finetune["warmup_epochs"]) == (5e-4, 0.75, 0.5)
    assert finetune["cutmix"] == 0 and finetune["mixup"] == 0
    # a -c the user names wins, and without weights nothing changes
    digits = _printed_config(capsys, "-c", "digits", "--initial-checkpoint", str(dense_nano_file))
    assert digits["lr"] == 4e-3 and digits["layer_decay"] is None
    assert _printed_config(capsys)["layer_decay"] is None


def test_the_header_names_the_recipe_and_the_variant_the_weights_hold(dense_nano_file, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
    code, out, err = cli(capsys, "train", "--data-dir", str(data), "--initial-checkpoint", str(dense_nano_file),
                         "--epochs", "1", "--batch-size", "6", "--workers", "0", "--threads", "1", "--num-experts",
                         "0", "--output", str(tmp_path / "run"), "--tensorboard", "false")
    assert code == 0, err
    log = (tmp_path / "run" / "train.log").read_text()
    assert "recipe -c finetune (picked by --initial-checkpoint without -c" in log
    assert "model gcvimoe_nano (from the initial checkpoint's weights" in log  # not the default gcvimoe_pico
    assert "layer_decay 0.75 (from config finetune)" in log
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["model"] == "gcvimoe_nano" and config["layer_decay"] == 0.75


def test_variant_of_tells_every_variant_from_its_weights():
    import timm
    for name in timm.list_models("gcvimoe_*"):
        assert variant_of(timm.create_model(name, num_experts=0, device="meta").state_dict()) == name
    assert variant_of(timm.create_model("gcvit_xxtiny", device="meta").state_dict()) == "gcvimoe_xxtiny"
    assert variant_of({"head.fc.weight": torch.zeros(2, 2)}) is None


def test_layer_decay_scales_the_lr_from_the_head_down_to_the_stem():
    model = create_model("gcvimoe_nano", num_experts=0)
    plain = _create_optimizer(build_config(None, {}), model, lr=1e-3)
    assert {group.get("lr_scale", 1.0) for group in plain.param_groups} == {1.0}
    optimizer = _create_optimizer(build_config(None, {"layer_decay": 0.5}), model, lr=1e-3)
    scale = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    # the model's group_matcher: stem layer 0, block i layer i (1..12 here), the head layer 13; scale 0.5^(13 - layer)
    depth = sum(len(stage.blocks) for stage in model.stages)
    assert scale[id(named["head.fc.weight"])] == 1.0
    assert scale[id(named["stem.conv1.weight"])] == pytest.approx(0.5 ** (depth + 1))
    first, last = named["stages.0.blocks.0.norm1.weight"], named["stages.3.blocks.1.norm1.weight"]
    assert scale[id(first)] == pytest.approx(0.5 ** depth) and scale[id(last)] == pytest.approx(0.5)
