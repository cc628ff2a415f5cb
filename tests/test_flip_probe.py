"""The flip default the training images decide (gcvimoe.data.flip_probe), and the notice for a run stuck at chance."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gcvimoe.cli import main
from gcvimoe.data.flip_probe import MAX_MIRROR_LOSS, MirrorProbe, decide_hflip, probe_arrays
from gcvimoe.train import build_config
from gcvimoe.train.build import derive_from_data
from gcvimoe.train.checks import at_chance, check_learning

pytestmark = pytest.mark.usefixtures("one_thread")


def _corner(dy, dx):
    """An L: a bar along one edge and a bar along the next, in the corner (dy, dx) of a 10x10 box."""
    box = np.zeros((10, 10))
    box[9 if dy else 0, :] = box[:, 9 if dx else 0] = 1
    return box


# each asymmetric class is the mirror image of another; each symmetric class is its own mirror image
ASYMMETRIC = {"bottom_left": _corner(1, 0), "bottom_right": _corner(1, 1), "top_left": _corner(0, 0),
              "top_right": _corner(0, 1)}
SYMMETRIC = {"hbar": np.pad(np.ones((2, 10)), ((4, 4), (0, 0))), "vbar": np.pad(np.ones((10, 2)), ((0, 0), (4, 4))),
             "frame": np.pad(np.zeros((8, 8)), 1, constant_values=1), "plus": np.maximum(
                 np.pad(np.ones((2, 10)), ((4, 4), (0, 0))), np.pad(np.ones((10, 2)), ((0, 0), (4, 4))))}


def _shape_folder(root, shapes, train_per_class=12, val_per_class=3):
    """16 px grey images: each class's shape at a random place, on noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, shape in shapes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, (16, 16)).astype(float)
                y, x = rng.integers(0, 7, size=2)
                image[y:y + 10, x:x + 10] += 180 * shape
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_the_probe_on_hand_made_images():
    """Two classes, two images each. Bright left column vs bright right column: mirroring turns each into the
    other class (accuracy 1 -> 0, the whole margin lost). Bright middle vs bright top row: mirroring changes nothing."""
    def image(rows=(), cols=()):
        x = torch.zeros(5, 5)
        x[list(rows), :] = 1
        x[:, list(cols)] = 1
        return x
    labels = torch.tensor([0, 0, 1, 1])
    sided = torch.stack([image(cols=[0]), image(cols=[0, 1]), image(cols=[4]), image(cols=[3, 4])])
    probe = probe_arrays(sided, labels, 2)
    assert (probe.accuracy, probe.mirrored_accuracy, probe.chance, probe.loss) == (1.0, 0.0, 0.5, 1.0)
    assert decide_hflip(probe)[0] == 0.0
    level = torch.stack([image(cols=[2]), image(cols=[1, 2, 3]), image(rows=[0]), image(rows=[0, 1])])
    probe = probe_arrays(level, labels, 2)
    assert (probe.accuracy, probe.mirrored_accuracy, probe.loss) == (1.0, 1.0, 0.0)
    assert decide_hflip(probe)[0] == 0.5


def test_decision_rule_threshold_and_chance_guard():
    just_over = MirrorProbe(0.9, 0.9 - 0.8 * (MAX_MIRROR_LOSS + 0.01), 0.1, 100)
    just_under = MirrorProbe(0.9, 0.9 - 0.8 * (MAX_MIRROR_LOSS - 0.01), 0.1, 100)
    assert decide_hflip(just_over)[0] == 0.0 and decide_hflip(just_under)[0] == 0.5
    hflip, why = decide_hflip(MirrorProbe(0.12, 0.0, 0.1, 100))  # the probe cannot tell the classes apart
    assert hflip == 0.5 and "barely beats chance" in why
    assert decide_hflip(None)[0] == 0.5


@pytest.mark.parametrize("shapes, hflip", [(ASYMMETRIC, 0.0), (SYMMETRIC, 0.5)])
def test_the_folder_decides_the_flip_and_a_flag_overrides_it(tmp_path, shapes, hflip):
    _shape_folder(tmp_path, shapes)
    cfg, _, notes = derive_from_data(build_config(None, {"data_dir": str(tmp_path)}))
    assert cfg.hflip == hflip
    note = next(note for note in notes if note.startswith("hflip "))
    assert note.startswith(f"hflip {hflip:g} (from the data: mirrored images lose ")
    assert ("so no flips" in note) == (hflip == 0.0)
    for explicit in (0.0, 0.5):
        cfg, _, notes = derive_from_data(build_config(None, {"data_dir": str(tmp_path), "hflip": explicit}))
        assert cfg.hflip == explicit and not any(note.startswith("hflip") for note in notes)


def test_the_decision_is_printed_logged_and_saved_and_a_run_at_chance_is_told(tmp_path, capsys):
    """A mirror-asymmetric folder without --hflip: --print-config, the header and config.yaml give hflip 0 and why.
    The same run at lr 1.0 without warmup cannot learn: one warning line says so and names the fixes."""
    data = _shape_folder(tmp_path / "data", ASYMMETRIC)
    assert main(["train", "--data-dir", str(data), "--print-config"]) == 0
    assert "hflip: 0.0  # from the data: mirrored images lose" in capsys.readouterr().out
    output = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--model", "gcvimoe_nano", "--model-kwargs", "{embed_dim: 16}",
                 "--num-experts", "4", "--img-size", "16", "--batch-size", "16", "--epochs", "1", "--warmup-epochs",
                 "0", "--lr", "1.0", "--workers", "0", "--threads", "1", "--no-tensorboard",
                 "--output", str(output)]) == 0
    log = (output / "train.log").read_text()
    assert "hflip 0 (from the data: mirrored images lose " in log
    assert yaml.safe_load((output / "config.yaml").read_text())["hflip"] == 0.0
    notices = [line for line in log.splitlines() if "not learning" in line]
    assert len(notices) == 1 and "--lr (now 1)" in notices[0] and "--warmup-epochs" in notices[0]


def test_chance_is_top1_near_one_over_the_classes_and_loss_near_ln_classes(caplog):
    assert at_chance(10.0, 2.30, 10) and at_chance(14.0, 5.8, 10)
    assert not at_chance(16.0, 2.30, 10)  # above 1.5 x chance: it learnt something
    assert not at_chance(10.0, 1.5, 10)  # a loss well under ln 10: it is learning
    row = {"epoch": 2, "eval_top1": 10.0, "eval_loss": 2.4}
    check_learning(row, 1.5, 10, 0.002)  # the first epoch after a 1.5-epoch warmup
    check_learning({**row, "epoch": 3}, 1.5, 10, 0.002)  # said once, not every epoch
    check_learning({**row, "epoch": 2, "eval_top1": 60.0, "eval_loss": 1.0}, 1.5, 10, 0.002)
    assert len([r for r in caplog.records if "not learning" in r.getMessage()]) == 1
