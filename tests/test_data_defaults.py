"""Defaults that follow the data: a folder's channels, input size and normalisation come from its images."""
import numpy as np
import pytest
from PIL import Image

from gcvimoe.cli import main
from gcvimoe.data import resolve_data_config
from gcvimoe.train import build_config
from gcvimoe.train.build import derive_from_data


def _folder(root, grey, side=28, per_class=40):
    """Two classes of random images with different brightness, so the pixel statistics are not trivial."""
    rng = np.random.default_rng(0)
    pixels = []
    for split in ("train", "val"):
        for label, (low, high) in enumerate(((0, 120), (60, 255))):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                shape = (side, side) if grey else (side, side, 3)
                image = rng.integers(low, high, shape, dtype=np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
                if split == "train":
                    pixels.append(image.reshape(-1, 1 if grey else 3) / 255.0)
    values = np.concatenate(pixels)
    return values.mean(0), values.std(0)


def test_a_grey_folder_gives_one_channel_and_its_own_mean_and_std(tmp_path):
    mean, std = _folder(tmp_path, grey=True)
    notes = []
    data_cfg = resolve_data_config("folder", str(tmp_path), notes=notes)
    assert data_cfg.in_chans == 1 and data_cfg.img_size == 32  # 28 px rounds up to GC ViT's multiple of 32
    assert data_cfg.mean == pytest.approx(tuple(mean), abs=0.01) and data_cfg.std == pytest.approx(tuple(std), abs=0.01)
    assert any(note.startswith("in_chans 1 (from the data") for note in notes)


def test_an_rgb_folder_keeps_three_channels_and_flags_override_the_data(tmp_path):
    mean, std = _folder(tmp_path, grey=False, side=70)
    data_cfg = resolve_data_config("folder", str(tmp_path))
    assert data_cfg.in_chans == 3 and data_cfg.img_size == 96
    assert data_cfg.mean == pytest.approx(tuple(mean), abs=0.01) and data_cfg.std == pytest.approx(tuple(std), abs=0.01)
    cfg, data_cfg, notes = derive_from_data(build_config(None, {"data_dir": str(tmp_path), "img_size": 64,
                                                                "in_chans": 1}))
    assert (cfg.img_size, cfg.in_chans, data_cfg.in_chans) == (64, 1, 1)
    assert not any(note.startswith(("img_size", "in_chans")) for note in notes)
    assert cfg.workers >= 1  # folder data is decoded in loader processes


def test_print_config_shows_what_the_data_decides(tmp_path, capsys):
    _folder(tmp_path, grey=True)
    assert main(["train", "--data-dir", str(tmp_path), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "in_chans: 1  # from the data" in out and "img_size: 32  # from the data" in out
    assert main(["train", "--data-dir", str(tmp_path / "missing"), "--print-config"]) == 0
    assert "in_chans: null  # from the data at start" in capsys.readouterr().out


def test_warmup_crops_and_regularisation_follow_the_folder(tmp_path):
    """80 training images of 28 px at batch 16 for 8 epochs: 5 updates an epoch, so 500 warmup updates would be 100
    epochs and the cap of a quarter of the schedule (2 epochs) decides; 80 images is a small set (at most 5,000):
    the strongest crops of small images (area 0.5-1) and the most drop path (0.1); folders are flipped."""
    _folder(tmp_path, grey=True)
    cfg, _, notes = derive_from_data(build_config(None, {"data_dir": str(tmp_path), "batch_size": 16, "epochs": 8}))
    assert (cfg.warmup_epochs, cfg.scale, cfg.drop_path_rate, cfg.hflip) == (2.0, [0.5, 1.0], 0.1, 0.5)
    assert cfg.model == "gcvimoe_pico"
    for key in ("warmup_epochs 2 (from the data", "scale [0.5, 1.0] (from the data", "drop_path_rate 0.1 (from the data",
                "hflip 0.5 ("):
        assert any(note.startswith(key) for note in notes), key
    # a -c file or a flag wins over the data, and then no header line claims the data decided it
    cfg, _, notes = derive_from_data(build_config(None, {"data_dir": str(tmp_path), "warmup_epochs": 0.5,
                                                         "scale": [0.9, 1.0], "drop_path_rate": 0.0, "hflip": 0.0}))
    assert (cfg.warmup_epochs, cfg.scale, cfg.drop_path_rate, cfg.hflip) == (0.5, [0.9, 1.0], 0.0, 0.0)
    assert not any(note.startswith(("warmup_epochs", "scale", "drop_path_rate", "hflip")) for note in notes)


@pytest.mark.parametrize("num_images, img_size, expected", [
    # 60,000 small images at batch 128: 468 updates an epoch, 500 updates = 1.07 epochs; a large set: lightest
    (60000, 32, {"warmup_epochs": 1.07, "scale": [1.0, 1.0], "drop_path_rate": 0.0}),
    # 5,000 * sqrt(10) images sit halfway (on a log scale) between the small and the large set
    (15811, 32, {"warmup_epochs": 1.5, "scale": [0.75, 1.0], "drop_path_rate": 0.05}),
    # 1,000 images: 7 updates an epoch, the warmup cap of a quarter of 6 epochs; larger images take stronger crops
    (1000, 96, {"warmup_epochs": 1.5, "scale": [0.08, 1.0], "drop_path_rate": 0.1}),
    (60000, 224, {"warmup_epochs": 1.07, "scale": [0.35, 1.0], "drop_path_rate": 0.0}),
])
def test_the_recipe_rules_give_hand_computed_values(num_images, img_size, expected):
    from gcvimoe.train.recipe import derive_recipe
    chosen, notes = derive_recipe({}, "folder", num_images, img_size, global_batch=128, epochs=6)
    assert {key: chosen[key] for key in expected} == expected
    assert chosen["hflip"] == 0.5 and len(notes) == len(chosen)
    assert derive_recipe({}, "digits", num_images, img_size, 128, 6)[0]["hflip"] == 0.0


def test_small_images_config_spells_out_the_defaults():
    """`-c small-images` is the starting point for a recipe of one's own: it must give what no -c gives."""
    from gcvimoe.train import TrainConfig
    assert build_config("small-images") == TrainConfig()
