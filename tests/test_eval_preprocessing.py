"""validate and predict at the right preprocessing: what they apply and where each value came from, timm's flags to
override it, a folder of class folders as data, grey models from plain state dicts, timm's result columns."""
import csv
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from helpers import assert_one_error_line, cli
from PIL import Image
from timm.data import create_transform

from gcvimoe.data import DataConfig, DigitsDataset, create_loader, resolve_data_config
from gcvimoe.data.folder import ImageFolder
from gcvimoe.models import model_from_checkpoint, read_checkpoint
from gcvimoe.train.distributed import DistInfo
from gcvimoe.train.evaluate import evaluate
from gcvimoe.train.preprocessing import recorded_sources, resolve_preprocessing

pytestmark = pytest.mark.usefixtures("one_thread")

CHECKPOINT = Path(__file__).parent / "fixtures" / "nano_moe_checkpoint.pth"  # digits, 16 px, crop 1.0, 1 channel
CPU = DistInfo(device=torch.device("cpu"))


def _top1(model, dataset, transform) -> float:
    """An eager reference: the model on every image of ``dataset`` through ``transform``."""
    dataset.transform = transform
    images, targets = zip(*(dataset[i] for i in range(len(dataset))), strict=True)  # by index: a Dataset has no end
    with torch.no_grad():
        predicted = model(torch.stack(images)).argmax(1)
    return 100.0 * int((predicted == torch.tensor(targets)).sum()) / len(targets)  # exact, as the evaluator counts


def _digit_folder(root: Path, per_class: int = 2) -> Path:
    """The first ``per_class`` val digits of every class as 8x8 grey PNGs in ``root/<class>/``."""
    digits, seen = DigitsDataset("val"), {}
    for image, target in digits:
        if seen.get(target, 0) < per_class:
            (root / str(target)).mkdir(parents=True, exist_ok=True)
            image.save(root / str(target) / f"{seen.get(target, 0)}.png")
            seen[target] = seen.get(target, 0) + 1
    return root


@pytest.fixture(scope="module")
def grey_plain(tmp_path_factory):
    """A plain state dict of a dense 1-channel gcvimoe_nano (what timm's save of the bare model gives)."""
    torch.manual_seed(3)
    model = timm.create_model("gcvimoe_nano", num_classes=10, num_experts=0).eval()
    path = tmp_path_factory.mktemp("plain") / "plain_state_dict.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("data", ["digits", "grey folder"])
def test_a_grey_plain_state_dict_validates_with_grey_statistics(grey_plain, data, tmp_path, capsys):
    """The channels come from the weights (1), so the mean and std come from the data, not ImageNet's 3."""
    model, path = grey_plain
    if data == "digits":
        argv, dataset, mean, std = ["--dataset", "digits"], DigitsDataset("val"), (0.3054,), (0.3761,)
    else:
        folder = _digit_folder(tmp_path / "grey")
        data_cfg = resolve_data_config("classes", str(folder), in_chans=1)
        argv, dataset, mean, std = ["--data-dir", str(folder)], ImageFolder(folder, None, mode="L"), data_cfg.mean, \
            data_cfg.std
    code, out, err = cli(capsys, "validate", "--model", "gcvimoe_nano", "--checkpoint", str(path), *argv, "--json",
                         "--workers", "0")
    assert code == 0, err
    result = json.loads(out)
    assert result["preprocessing"]["input_size"] == [1, 32, 32]
    assert result["preprocessing"]["mean"] == pytest.approx(mean) and len(result["preprocessing"]["std"]) == 1
    assert result["preprocessing"]["sources"]["mean"].startswith("the data")
    transform = create_transform((1, 32, 32), crop_pct=0.875, interpolation="bicubic", mean=mean, std=std)
    assert result["top1"] == pytest.approx(_top1(model, dataset, transform), abs=1e-6)


def test_timm_flags_override_the_checkpoint_and_the_report_says_where_each_came_from(capsys):
    flags = ["--input-size", "1", "16", "16", "--crop-pct", "0.75", "--interpolation", "bilinear", "--mean", "0.5",
             "--std", "0.25"]
    code, out, err = cli(capsys, "validate", "--checkpoint", str(CHECKPOINT), *flags, "--workers", "0")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "preprocessing:"
    assert lines[1].split() == ["input_size", "1x16x16", "from", "--input-size"]
    assert lines[2].split() == ["crop_pct", "0.75", "from", "--crop-pct"]
    assert lines[3].split() == ["interpolation", "bilinear", "from", "--interpolation"]
    assert lines[4].split() == ["mean", "0.5", "from", "--mean"]

    code, out, _ = cli(capsys, "validate", "--checkpoint", str(CHECKPOINT), "--crop-pct", "0.75", "--json",
                       "--workers", "0")
    result = json.loads(out)
    assert result["preprocessing"]["sources"] == dict(recorded_sources(), crop_pct="--crop-pct")
    assert (result["img_size"], result["crop_pct"], result["interpolation"]) == (16, 0.75, "bicubic")
    model = model_from_checkpoint(CHECKPOINT)
    transform = create_transform((1, 16, 16), crop_pct=0.75, interpolation="bicubic", mean=(0.3054,), std=(0.3761,))
    assert result["top1"] == pytest.approx(_top1(model, DigitsDataset("val"), transform), abs=1e-6)


def test_overrides_resolve_as_timm_resolves_them():
    base = DataConfig.from_dict(read_checkpoint(CHECKPOINT).data_config)
    prep = resolve_preprocessing(base, recorded_sources(), {"img_size": 48, "mean": [0.5], "crop_pct": None})
    assert (prep.data_cfg.img_size, prep.data_cfg.in_chans, prep.data_cfg.mean, prep.data_cfg.std) == \
        (48, 1, (0.5,), base.std)
    assert prep.sources == dict(recorded_sources(), input_size="--img-size", mean="--mean")
    assert resolve_preprocessing(base, recorded_sources(), {}).data_cfg == base


@pytest.mark.parametrize("flags, fragments", [
    (["--input-size", "1", "16", "24"], ("not square", "--img-size")),
    (["--input-size", "3", "16", "16"], ("3 channels", "takes 1", "--input-size 1 16 16")),
    (["--mean", "0.5", "0.5", "0.5"], ("--mean has 3 values", "1 channels")),
    (["--crop-pct", "-1"], ("--crop-pct must be positive",)),
])
def test_bad_overrides_are_one_line(flags, fragments, capsys):
    code, _, err = cli(capsys, "validate", "--checkpoint", str(CHECKPOINT), *flags)
    assert_one_error_line(code, err, *fragments)


def test_data_dir_takes_a_folder_of_class_folders_as_its_val_split(tmp_path, capsys):
    flat = _digit_folder(tmp_path / "dataset" / "val")
    _digit_folder(tmp_path / "dataset" / "train", per_class=1)
    results = {}
    for name, data_dir in (("flat", flat), ("split", flat.parent)):
        code, out, err = cli(capsys, "validate", "--checkpoint", str(CHECKPOINT), "--data-dir", str(data_dir),
                             "--json", "--workers", "0")
        assert code == 0, err
        results[name] = json.loads(out)
    assert results["flat"]["num_images"] == results["split"]["num_images"] == 20
    assert results["flat"]["top1"] == results["split"]["top1"]
    assert results["flat"]["dataset"] == "classes"
    code, _, err = cli(capsys, "train", "--data-dir", str(flat), "--epochs", "1", "--output", str(tmp_path / "run"))
    assert_one_error_line(code, err, "one folder of class folders", "train/ and val/")


def test_results_files_carry_timms_columns(tmp_path, capsys):
    validated = tmp_path / "validate.csv"
    code, _, err = cli(capsys, "validate", "--checkpoint", str(CHECKPOINT), "--results-file", str(validated),
                       "--workers", "0")
    assert code == 0, err
    with open(validated) as f:
        reader = csv.DictReader(f)
        (row,) = list(reader)
    assert reader.fieldnames[:9] == ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size",
                                     "crop_pct", "interpolation"]
    model = model_from_checkpoint(CHECKPOINT)
    assert float(row["top1"]) + float(row["top1_err"]) == pytest.approx(100)
    assert float(row["param_count"]) == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert (row["model"], row["img_size"], row["crop_pct"], row["interpolation"]) == \
        ("gcvimoe_nano", "16", "1.0", "bicubic")

    images = _digit_folder(tmp_path / "images", per_class=1)
    predicted = tmp_path / "predict.csv"
    code, _, err = cli(capsys, "predict", "--checkpoint", str(CHECKPOINT), str(images), "--topk", "2",
                       "--results-file", str(predicted))
    assert code == 0, err
    assert "preprocessing:" in err and "from the checkpoint" in err
    with open(predicted) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["filename", "label_0", "label_1", "prob_0", "prob_1"]
    transform = create_transform((1, 16, 16), crop_pct=1.0, interpolation="bicubic", mean=(0.3054,), std=(0.3761,))
    for row in rows:
        with torch.no_grad():
            probs = model(transform(Image.open(row["filename"]).convert("L"))[None]).softmax(1)[0]
        top = probs.topk(2)
        assert [row["label_0"], row["label_1"]] == [str(i) for i in top.indices.tolist()]
        assert [float(row["prob_0"]), float(row["prob_1"])] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_evaluation_logs_no_progress_lines_when_not_on_a_terminal(caplog):
    model = model_from_checkpoint(CHECKPOINT)
    data_cfg = DataConfig.from_dict(read_checkpoint(CHECKPOINT).data_config)
    dataset = DigitsDataset("val", transform=create_transform((1, 16, 16), crop_pct=1.0, mean=data_cfg.mean,
                                                              std=data_cfg.std))
    dataset = torch.utils.data.Subset(dataset, range(40))
    with caplog.at_level(logging.INFO, logger="gcvimoe"):
        evaluate(model, create_loader(dataset, 4, is_training=False), 10, CPU)  # 10 batches, stderr not a terminal
    assert not [record for record in caplog.records if "batches" in record.getMessage()]


def test_data_config_round_trips_through_the_preprocessing_unchanged():
    base = DataConfig.from_dict(read_checkpoint(CHECKPOINT).data_config)
    prep = resolve_preprocessing(base, recorded_sources(), {"interpolation": "bicubic"})
    assert dataclasses.asdict(prep.data_cfg) == dataclasses.asdict(base)
