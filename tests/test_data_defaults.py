"""Defaults that follow the data: a folder's channels, input size and normalisation come from its images."""
import numpy as np
import pytest
from PIL import Image

from gcvimoe.cli import main
from gcvimoe.data import resolve_data_config
from gcvimoe.train import build_config
from gcvimoe.train.trainer import derive_from_data


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
