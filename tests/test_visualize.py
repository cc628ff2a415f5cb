"""`gcvimoe visualize` and the live plots: routing maps equal the router's own top-1 choices, the counts in
stats.json add up, bad inputs are one line, and the plotting callback draws steps and integer epochs."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gcvimoe.analysis.routing import sample_across_classes
from gcvimoe.analysis.style import layer_title
from gcvimoe.cli import main
from helpers import assert_one_error_line, run_cli
from gcvimoe.cli._common import PlotCallback, train_loss_label
from gcvimoe.data import build_transform, load_image, resolve_data_config
from gcvimoe.models import create_model, model_from_checkpoint
from gcvimoe.moe import moe_layers
from gcvimoe.train.config import build_config

pytestmark = pytest.mark.usefixtures("one_thread")

# A half-width nano (built for 32 px) shown 64 px digits: stage 3's token map is 4x4 in 2x2 windows, so window
# order and image order differ and a map in the wrong order cannot pass.
IMG_SIZE = 64
GRID, WINDOW = (4, 4), (2, 2)
NUM_EXPERTS = 4


def save_checkpoint(path, num_experts=NUM_EXPERTS, **moe):
    torch.manual_seed(0)
    model = create_model("gcvimoe_nano", num_classes=10, embed_dim=16, num_experts=num_experts, **moe)
    data_config = resolve_data_config("digits", img_size=IMG_SIZE)
    torch.save({"model_name": "gcvimoe_nano", "model_args": model.model_args, "state_dict": model.state_dict(),
                "data_config": data_config.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "moe.pth")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def images_run(checkpoint, image_files, tmp_path_factory):
    output = tmp_path_factory.mktemp("viz_images")
    assert main(["visualize", "--checkpoint", str(checkpoint), "--images", *map(str, image_files),
                 "--output", str(output)]) == 0
    return output, json.loads((output / "stats.json").read_text())


@pytest.fixture(scope="module")
def dataset_run(checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("viz_digits")
    assert main(["visualize", "--checkpoint", str(checkpoint), "--per-class", "2", "--output", str(output)]) == 0
    return output, json.loads((output / "stats.json").read_text())


def test_images_give_a_routing_map_each_and_stats(images_run, image_files):
    output, stats = images_run
    maps = sorted(p.name for p in (output / "routing_maps").iterdir())
    assert maps == ["00_a.png", "01_b.png"]
    assert [image["image"] for image in stats["images"]] == [str(p) for p in image_files]
    assert (output / "expert_load.png").is_file()
    assert not (output / "class_expert.png").exists()  # the files have no labels


def test_token_counts_add_up_to_images_times_tokens(images_run, dataset_run):
    for _, stats in (images_run, dataset_run):
        assert len(stats["layers"]) == 4
        for name, layer in stats["layers"].items():
            tokens_per_image = layer["token_grid"][0] * layer["token_grid"][1]
            assert layer["num_tokens"] == stats["num_images"] * tokens_per_image
            assert sum(layer["tokens_per_expert"]) == layer["num_tokens"]  # top-1: one assignment per token
            assert sum(layer["top1_tokens_per_expert"]) == layer["num_tokens"]
            assert layer["kept_tokens_per_expert"] == layer["tokens_per_expert"]  # dropless evaluation
            assert not layer["capacity_applies"]
    assert stats["layers"]["stages.2.blocks.1.mlp"]["token_grid"] == list(GRID)


def router_top1_grids(checkpoint, image_path):
    """Each MoE layer's top-1 expert per token, from the router's logits, placed on the token grid by hand."""
    model = model_from_checkpoint(checkpoint).eval()
    logits = {}
    for name, layer in moe_layers(model):
        layer.router.register_forward_hook(lambda module, args, out, name=name: logits.__setitem__(name, out))
    data_cfg = resolve_data_config("digits", img_size=IMG_SIZE)
    with torch.no_grad():
        model(build_transform(data_cfg)(load_image(image_path, "L")).unsqueeze(0))
    grids = {}
    for name, layer_logits in logits.items():
        top1 = layer_logits.argmax(dim=-1)  # tokens in window order: window by window, row-major inside a window
        if name.startswith("stages.2."):
            (gh, gw), (wh, ww) = (GRID[0] // WINDOW[0], GRID[1] // WINDOW[1]), WINDOW
            grid = top1.view(gh, gw, wh, ww).permute(0, 2, 1, 3).reshape(GRID)
        else:  # stage 4: a 2x2 map in a single window
            grid = top1.view(2, 2)
        grids[name] = grid.tolist()
    return grids


def test_routing_map_equals_the_routers_top1_choices(checkpoint, image_files, images_run):
    _, stats = images_run
    for image_path, image in zip(image_files, stats["images"]):
        expected = router_top1_grids(checkpoint, image_path)
        assert image["top1_expert"] == expected
        assert any(len(set(sum(grid, []))) > 1 for grid in expected.values())  # not one expert everywhere


def test_class_expert_counts_sum_to_the_expert_counts(dataset_run):
    output, stats = dataset_run
    assert stats["num_images"] == 20 and (output / "class_expert.png").is_file()
    assert sorted(image["label"] for image in stats["images"]) == sorted([str(d) for d in range(10)] * 2)
    for layer in stats["layers"].values():
        by_class = np.array(list(layer["class_tokens_per_expert"].values()))
        assert by_class.shape == (10, NUM_EXPERTS)
        assert by_class.sum(axis=0).tolist() == layer["tokens_per_expert"]
        assert set(by_class.sum(axis=1)) == {layer["num_tokens"] // 10}  # two images of each class


def test_dropped_tokens_are_marked_where_capacity_applies(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "capacity.pth", eval_capacity_factor=0.5)
    output = tmp_path / "viz"
    assert main(["visualize", "--checkpoint", str(checkpoint), "--per-class", "1", "--output", str(output)]) == 0
    stats = json.loads((output / "stats.json").read_text())
    total_dropped = 0
    for name, layer in stats["layers"].items():
        assert layer["capacity_applies"]
        dropped = sum(np.sum(image["dropped"].get(name, 0)) for image in stats["images"])
        assert dropped == sum(layer["tokens_per_expert"]) - sum(layer["kept_tokens_per_expert"])
        assert layer["dropped_fraction"] == pytest.approx(dropped / layer["num_tokens"])
        total_dropped += dropped
    assert total_dropped > 0


def test_layer_titles_are_the_readmes_words():
    assert layer_title("stages.2.blocks.1.mlp") == "stage 3, block 2"
    assert layer_title("stages.3.blocks.0.mlp") == "stage 4, block 1"
    assert layer_title("moe") == "moe"


def test_sampling_takes_every_class_evenly():
    targets = [0] * 5 + [1] * 1 + [2] * 5 + [3] * 5
    chosen = sample_across_classes(targets, per_class=2, max_images=40)
    assert sorted(targets[i] for i in chosen) == [0, 0, 1, 2, 2, 3, 3]
    assert chosen == sample_across_classes(targets, per_class=2, max_images=40)  # reproducible
    capped = sample_across_classes(list(range(100)), per_class=1, max_images=4)
    assert capped == [0, 25, 50, 75]


def test_dense_checkpoint_has_nothing_to_map(tmp_path, capsys):
    dense = save_checkpoint(tmp_path / "dense.pth", num_experts=0)
    code, err = run_cli(capsys, "visualize", "--checkpoint", str(dense), "--output", str(tmp_path / "viz"))
    assert_one_error_line(code, err, "dense.pth", "nothing to map")


def test_unreadable_image_is_named_and_skipped(checkpoint, image_files, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    code, err = run_cli(capsys, "visualize", "--checkpoint", str(checkpoint), "--images", str(image_files[0]),
                        str(broken), "--output", str(tmp_path / "viz"))
    assert code == 0
    assert [line for line in err.splitlines() if "broken.png" in line] == [line for line in err.splitlines() if line]
    assert [p.name for p in (tmp_path / "viz" / "routing_maps").iterdir()] == ["00_a.png"]


@pytest.mark.parametrize("what", ["empty folder", "only unreadable files"])
def test_images_without_readable_files_is_one_line(checkpoint, tmp_path, capsys, what):
    folder = tmp_path / "images"
    folder.mkdir()
    if what == "only unreadable files":
        (folder / "x.png").write_bytes(b"junk")
    code, err = run_cli(capsys, "visualize", "--checkpoint", str(checkpoint), "--images", str(folder),
                        "--output", str(tmp_path / "viz"))
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(error_lines) == 1 and "Traceback" not in err, err
    assert ("holds no image files" if what == "empty folder" else "none of the 1 image files") in error_lines[0]


def test_plot_callback_draws_steps_and_the_latest_epoch(tmp_path):
    model = create_model("gcvimoe_nano", num_classes=10, embed_dim=16, num_experts=NUM_EXPERTS)
    cfg = build_config("digits", {"smoothing": 0.1})
    run = SimpleNamespace(output_dir=tmp_path, cfg=cfg, model=model, total_epochs=2, train_loader=range(450))
    callback = PlotCallback()
    for epoch in range(2):
        for batch in range(450):
            callback.on_step_end(run, epoch, batch, {"loss": 1.0, "aux_loss": 0.01, "lr": epoch * 450 + batch})
    # 450 steps in buckets of 3: 150 points an epoch, each at its last step's fraction and LR
    assert len(callback.steps["epoch"]) == 300
    assert callback.steps["epoch"][:2] == pytest.approx([3 / 450, 6 / 450]) and callback.steps["epoch"][-1] == 2.0
    assert callback.steps["lr"][:2] == [2, 5]
    row = {"epoch": 2, "train_loss": 1.0, "train_aux_loss": 0.01, "eval_loss": 0.5, "eval_top1": 90.0,
           "eval_top5": 99.0, "lr": 899}
    experts = {name: {"tokens_per_expert": [0.25] * NUM_EXPERTS, "dropped_fraction": 0.0}
               for name, _ in moe_layers(model)}
    callback.on_epoch_end(run, SimpleNamespace(history=[{**row, "epoch": 1}, row]), {"experts": experts})
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "expert_usage.png").is_file()
    assert train_loss_label(cfg) == "train loss (label-smoothed CE, smoothing 0.1)"
    assert train_loss_label(build_config("digits", {"smoothing": 0.0, "cutmix": 1.0})).startswith(
        "train loss (soft-target CE")
