"""The training config: YAML + command-line precedence, key and type checking, LR scaling."""
import math

import pytest
import yaml

from gcvimoe.train.config import (
    TrainConfig, apply_overrides, build_config, find_config, load_yaml, parse_cli_value, save_config, scaled_lr)
from gcvimoe.errors import GcvimoeError


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_base_file_cli(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", {"epochs": 7, "lr": 1e-3, "batch_size": 32})
    cfg = build_config(config_file, {"epochs": 3}, base={"epochs": 9, "batch_size": 16, "seed": 5})
    assert cfg.epochs == 3  # command line beats the file
    assert cfg.batch_size == 32  # the file beats the checkpoint's config
    assert cfg.seed == 5  # the checkpoint's config beats the defaults
    assert cfg.lr == 1e-3
    assert cfg.weight_decay == TrainConfig().weight_decay


def test_unknown_yaml_key_suggests_nearest(tmp_path):
    config_file = write_yaml(tmp_path / "bad.yaml", {"epoch": 3})
    with pytest.raises(GcvimoeError, match=r"unknown config key 'epoch' in .*bad.yaml; did you mean 'epochs'\?"):
        build_config(config_file)


def test_unknown_key_without_neighbour_points_to_help():
    with pytest.raises(GcvimoeError, match="unknown config key 'zzzzzz'.*gcvimoe train --help"):
        apply_overrides(TrainConfig(), {"zzzzzz": 1}, "test")


@pytest.mark.parametrize("key, value, expected", [
    ("epochs", "ten", "must be an integer, got 'ten'"),
    ("epochs", 2.5, "must be an integer, got 2.5"),
    ("epochs", True, "must be an integer, got True"),
    ("ema", "yes", "must be true or false"),
    ("lr", "fast", "must be a number"),
    ("scale", 0.5, "must be a list of numbers"),
    ("model", 3, "must be a string"),
    ("sched", "cosin", "must be one of cosine"),
])
def test_wrong_value_type_is_one_line(key, value, expected):
    with pytest.raises(GcvimoeError, match=expected) as info:
        apply_overrides(TrainConfig(), {key: value}, "test")
    assert "\n" not in str(info.value)


def test_numbers_as_pyyaml_reads_them(tmp_path):
    # PyYAML reads 5e-3 (no dot) as a string; a float key accepts it, an int is widened
    config_file = tmp_path / "lr.yaml"
    config_file.write_text("lr: 5e-3\nweight_decay: 0\nscale: [0.5, 1]\n")
    cfg = build_config(config_file)
    assert cfg.lr == 5e-3 and isinstance(cfg.weight_decay, float) and cfg.scale == [0.5, 1.0]


def test_dashes_accepted_in_keys():
    assert apply_overrides(TrainConfig(), {"num-experts": 4}, "test").moe.num_experts == 4


@pytest.mark.parametrize("key, text, expected", [
    ("epochs", "5", 5),
    ("lr", "5e-3", 5e-3),
    ("ema", "true", True),
    ("ema", "off", False),
    ("drop_path_rate", "null", None),
    ("num_experts", "0", 0),
    ("scale", "0.5,1", [0.5, 1.0]),
    ("scale", "[0.25, 0.75]", [0.25, 0.75]),
    ("model_kwargs", "{embed_dim: 16}", {"embed_dim": 16}),
    ("output", "runs/a", "runs/a"),
])
def test_parse_cli_value(key, text, expected):
    assert parse_cli_value(key, text) == expected


def test_parse_cli_value_error_names_the_option():
    with pytest.raises(GcvimoeError, match=r"--batch-size must be an integer, got 'big'"):
        parse_cli_value("batch_size", "big")


@pytest.mark.parametrize("overrides, expected", [
    ({"epochs": 0}, "'epochs' must be at least 1"),
    ({"lr": -1.0}, "'lr' must not be negative"),
    ({"scale": [1.0, 0.5]}, "'scale' must be \\[low, high\\]"),
    ({"in_chans": 2}, "'in_chans' must be 1 or 3"),
])
def test_range_checks(overrides, expected):
    with pytest.raises(GcvimoeError, match=expected):
        build_config(cli_overrides=overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(GcvimoeError, match="config file .*missing.yaml not found"):
        load_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1\n")
    with pytest.raises(GcvimoeError, match="not valid YAML at line"):
        load_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(GcvimoeError, match="must hold a mapping"):
        load_yaml(listing)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = build_config(cli_overrides={"epochs": 4, "scale": [0.3, 1.0], "model_kwargs": {"embed_dim": 16}})
    save_config(cfg, tmp_path / "config.yaml")
    assert build_config(tmp_path / "config.yaml") == cfg


def test_lr_follows_global_batch():
    cfg = build_config(cli_overrides={"lr": 1e-3, "lr_batch_size": 64})
    assert scaled_lr(cfg, 64) == pytest.approx(1e-3)
    assert scaled_lr(cfg, 256) == pytest.approx(4e-3)
    sqrt_cfg = apply_overrides(cfg, {"lr_scale": "sqrt"}, "test")
    assert scaled_lr(sqrt_cfg, 256) == pytest.approx(2e-3)
    assert scaled_lr(TrainConfig(lr=1e-3), 4096) == 1e-3  # no lr_batch_size: the LR is used as given
    assert math.isclose(scaled_lr(cfg, 32), 5e-4)


def test_resolved_dataset():
    assert TrainConfig().resolved_dataset == "digits"
    assert TrainConfig(data_dir="/data").resolved_dataset == "folder"
    assert TrainConfig(dataset="fashion-mnist", data_dir="/x").resolved_dataset == "fashion-mnist"


# a value other than the GCViMoE default for every MoE option; the guard below fails when an option is added
NON_DEFAULT_MOE = dict(
    num_experts=4, top_k=2, capacity_factor=2.0, eval_capacity_factor=2.0, router="cosine", normalize_gates=True,
    batch_priority=False, gate_noise=1.0, expert_dropout=0.0, balance_loss="gshard", aux_loss_weight=0.5,
    z_loss_weight=1e-3, shared_expert=True, moe_blocks="last 2 odd blocks")


def test_every_moe_option_reaches_the_model(tmp_path):
    """Every MoE option, from a YAML moe: section or the command line, lands in the model's MoE layers."""
    from gcvimoe.data.factory import resolve_data_config
    from gcvimoe.models import create_model
    from gcvimoe.moe import GCVIMOE, moe_layers
    from gcvimoe.moe.config import FIELDS
    from gcvimoe.train.build import model_args

    assert set(NON_DEFAULT_MOE) == set(FIELDS)
    assert all(NON_DEFAULT_MOE[name] != getattr(GCVIMOE, name) for name in FIELDS)
    from_file = {k: v for k, v in NON_DEFAULT_MOE.items() if k != "batch_priority"}
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump({"model": "gcvimoe_nano", "moe": from_file}))  # six stage-3 blocks
    cfg = build_config(path, {"batch_priority": parse_cli_value("batch_priority", "false")})
    model = create_model(cfg.model, **model_args(cfg, resolve_data_config("digits", img_size=32)))
    layers = dict(moe_layers(model))
    assert list(layers) == ["stages.2.blocks.5.mlp", "stages.3.blocks.1.mlp"]
    for layer in layers.values():
        assert layer.config.to_dict() == {**NON_DEFAULT_MOE, "moe_blocks": "last 2 odd blocks"}
        assert layer.shared_expert is not None and layer.config.router == "cosine"
    assert model.moe_config == cfg.moe


def test_flat_moe_keys_of_old_files_still_work(tmp_path):
    """gcvimoe 0.1 wrote MoE options at the top level (null = the model's default): still read, with a warning."""
    path = tmp_path / "old.yaml"
    path.write_text("num_experts: 4\ntop_k: 2\nrouter: null\n")
    with pytest.warns(FutureWarning, match="put it under 'moe:'"):
        cfg = build_config(path)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.router) == (4, 2, "linear")


def test_unknown_moe_option_names_the_nearest():
    with pytest.raises(GcvimoeError, match=r"unknown MoE option 'moe.topk'.*did you mean 'top_k'"):
        build_config(cli_overrides={"moe": {"topk": 2}})


def test_builtin_configs_by_name():
    cfg = build_config("fashion_mnist")
    assert cfg.resolved_dataset == "fashion-mnist" and cfg.moe.num_experts == 8
    with pytest.raises(GcvimoeError, match="did you mean 'digits'"):
        build_config("digit")
    assert find_config("imagenet") == find_config("gcvimoe_tiny")  # the recipe name of the ImageNet default
    assert find_config("small-images") == find_config("small_images")
    with pytest.raises(GcvimoeError, match="did you mean 'imagenet'"):
        build_config("imagenett")


def test_a_negative_keep_last_is_refused_before_anything_is_deleted(capsys):
    """`--keep-last -2` once read as 'keep the newest -2', which pruning took as every epoch checkpoint."""
    from helpers import assert_one_error_line, run_cli
    code, err = run_cli(capsys, "train", "--keep-last", "-2", "--checkpoint-every", "1", "--print-config")
    assert_one_error_line(code, err, "keep_last", "must not be negative")
