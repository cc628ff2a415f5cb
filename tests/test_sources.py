"""The dataset-source registry and its stream sources: tar shards (split over processes and workers, resumed
bitwise) and Hugging Face datasets saved to disk, on the digits written as PNG class folders."""
import ast
import itertools
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import default_collate

from gcvimoe.cli import main
from gcvimoe.data import (
    DataSource, Native, batches_per_epoch, build_transform, create_dataset, create_loader, register_source,
    resolve_data_config, set_epoch, source_names)
from gcvimoe.data.arrays import ArrayImageDataset
from gcvimoe.data.digits import digits_split
from gcvimoe.data.loaders import SeededSamples
from gcvimoe.data.shard_stream import SHUFFLE_BUFFER, buffer_shuffle, shard_samples, worker_progress
from gcvimoe.data.sources import _SOURCES
from gcvimoe.train import build_config, train
from gcvimoe.train.evaluate import validate_checkpoint
from helpers import assert_one_error_line, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"model_kwargs": {"embed_dim": 16}, "img_size": 16, "batch_size": 48, "epochs": 2, "warmup_epochs": 1,
        "threads": 1, "tensorboard": False, "log_interval": 3, "hflip": 0.5, "scale": [0.5, 1.0],
        "moe": {"num_experts": 4}}
SRC = Path(__file__).resolve().parents[1] / "src" / "gcvimoe"


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """scikit-learn's digits as 8x8 PNGs: DIR/train/<digit>/*.png (1437) and DIR/val/<digit>/*.png (360)."""
    root = tmp_path_factory.mktemp("digits")
    for split in ("train", "val"):
        images, labels = digits_split(split)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / str(label) / f"{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def digits_shards(digits_folder, tmp_path_factory):
    """The digits folder as shards of 100 images: 15 train shards (the last of 37) and 4 val shards."""
    output = tmp_path_factory.mktemp("shards") / "digits"
    assert main(["convert", "shards", str(digits_folder), str(output), "--images-per-shard", "100"]) == 0
    return output


def _pixels(image):
    return torch.from_numpy(np.asarray(image).copy()).flatten()


def _stream(shards, split="train"):
    """A shard split whose samples are their raw 64 pixels, so each is recognised."""
    data_cfg = resolve_data_config("wds", str(shards), img_size=16)
    return create_dataset(data_cfg, split, transform=_pixels)


def _rows(batches):
    return sorted(tuple(row.tolist()) for images, _ in batches for row in images)


def test_convert_writes_shards_and_the_index(digits_shards, capsys):
    names = sorted(path.name for path in digits_shards.iterdir())
    assert names == ["_info.json", *(f"train-{i:06d}.tar" for i in range(15)), *(f"val-{i:06d}.tar" for i in range(4))]
    assert build_config(None, {"data_dir": str(digits_shards)}).resolved_dataset == "wds"
    pattern = str(digits_shards / "train-{000000..000003}.tar")
    assert build_config(None, {"data_dir": pattern}).resolved_dataset == "wds"
    data_cfg = resolve_data_config("wds", pattern)
    assert data_cfg.class_names == [str(d) for d in range(10)] and data_cfg.in_chans == 1 and data_cfg.img_size == 32
    assert len(create_dataset(data_cfg, "train")) == 400 and len(create_dataset(data_cfg, "val")) == 360


@pytest.mark.parametrize("split", ["train", "val"])
def test_two_processes_by_two_workers_see_every_sample_exactly_once(digits_folder, digits_shards, split):
    """Evaluation reads every sample exactly once over 2 processes x 2 workers; training reads each at most once,
    every worker the full batches of its three smallest shards' worth (15 shards over 4 slots)."""
    stream, is_training = _stream(digits_shards, split), split == "train"
    seen, counts = [], []
    for rank in (0, 1):
        loader = create_loader(stream, batch_size=16, is_training=is_training, workers=2, rank=rank, world_size=2,
                               seed=5)
        set_epoch(loader, 3, seed=5, rank=rank)
        batches = list(loader)
        assert len(batches) == batches_per_epoch(loader)
        seen += _rows(batches)
        counts += loader._counts()
    folder = sorted(tuple(_pixels(Image.open(path)).tolist()) for path in (digits_folder / split).rglob("*.png"))
    if not is_training:
        assert sorted(seen) == folder
        return
    assert len(set(seen)) == len(seen) - (len(folder) - len(set(folder)))  # no sample twice (the digits repeat a few)
    assert not set(seen) - set(folder)
    assert counts == [(37 + 100 + 100) // 16] * 4 and len(seen) == 4 * 14 * 16


def test_worker_progress_takes_workers_in_turn_and_skips_finished_ones():
    # workers with 1, 3 and 2 batches give them as 0 1 2 1 2 1
    assert worker_progress([1, 3, 2], 0) == ([0, 0, 0], 0)
    assert worker_progress([1, 3, 2], 3) == ([1, 1, 1], 1)
    assert worker_progress([1, 3, 2], 4) == ([1, 2, 1], 2)
    assert worker_progress([1, 3, 2], 5) == ([1, 2, 2], 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_of_shards_started_at_a_batch_continues_the_same_batches_bitwise(digits_shards, workers):
    data_cfg = resolve_data_config("wds", str(digits_shards), img_size=16)
    stream = create_dataset(data_cfg, "train", build_transform(data_cfg, is_training=True, scale=(0.5, 1.0),
                                                               hflip=0.5))
    loader = create_loader(stream, batch_size=32, is_training=True, workers=workers, rank=1, world_size=2, seed=3)
    set_epoch(loader, 2, seed=3, rank=1)
    torch.manual_seed(0)
    whole = [(images.clone(), targets.clone()) for images, targets in loader]
    for start in (1, 5, len(whole) - 1):  # the last start is past a finished worker when the workers are uneven
        set_epoch(loader, 2, seed=3, rank=1, start_batch=start)
        torch.manual_seed(start)  # the caller's stream does not matter: each sample has its own
        caller_stream = torch.get_rng_state()
        rest = list(loader)
        assert torch.equal(torch.get_rng_state(), caller_stream)  # nor is it drawn from (a resume restores it)
        assert len(rest) == len(whole) - start and batches_per_epoch(loader) == len(whole)
        for (images, targets), (expected_images, expected_targets) in zip(rest, whole[start:], strict=True):
            assert torch.equal(targets, expected_targets) and torch.equal(images, expected_images)
    torch.manual_seed(11)
    expected_draws = [torch.rand(1) for _ in whole]
    set_epoch(loader, 2, seed=3, rank=1)
    torch.manual_seed(11)
    assert [torch.rand(1) for _ in loader] == expected_draws  # the trainer's draws between batches are its own
    set_epoch(loader, 3, seed=3, rank=1)
    assert not torch.equal(next(iter(loader))[1], whole[0][1])  # another epoch, another order


def test_shard_batches_equal_the_folder_read_in_the_shard_order(digits_folder, digits_shards):
    """The same seed and order rule give the same training batches, bitwise, from the folder and the shards: the
    shards hold the folder's bytes and seed each sample by its index in the folder. The orders themselves differ (a
    stream of shards cannot follow the folder's global shuffle), so a shard run's top-1 equals the folder run's only
    for the same order; evaluation, where order does not matter, gives the same top-1 (the next test)."""
    transform_args = dict(is_training=True, scale=(0.5, 1.0), hflip=0.5)
    shard_cfg = resolve_data_config("wds", str(digits_shards), img_size=16, in_chans=1)
    folder_cfg = resolve_data_config("folder", str(digits_folder), img_size=16, in_chans=1)
    folder_cfg.mean, folder_cfg.std = shard_cfg.mean, shard_cfg.std
    stream = create_dataset(shard_cfg, "train", build_transform(shard_cfg, **transform_args))
    loader = create_loader(stream, batch_size=32, is_training=True, seed=7)
    set_epoch(loader, 1, seed=7)
    task = loader.plan()[0]
    raw = buffer_shuffle(shard_samples(task.shards), SHUFFLE_BUFFER, random.Random(task.shuffle_seed))
    order = [int(sample.key) for sample in itertools.islice(raw, task.batches * 32)]
    folder = SeededSamples(create_dataset(folder_cfg, "train", build_transform(folder_cfg, **transform_args)), seed=7)
    folder.epoch = 1
    batches = [order[start:start + 32] for start in range(0, len(order), 32)]
    for batch, (images, targets) in zip(batches, loader, strict=True):
        expected_images, expected_targets = default_collate(folder.__getitems__(batch))
        assert torch.equal(images, expected_images) and torch.equal(targets, expected_targets)


@pytest.fixture(scope="module")
def shard_run(digits_shards, tmp_path_factory):
    """An uninterrupted 2-epoch run on the shards with 2 loader workers, saving every 5 steps."""
    output = tmp_path_factory.mktemp("shard_run")
    train(build_config(None, dict(TINY, data_dir=str(digits_shards), workers=2, output=str(output),
                                  save_interval="5")))
    return output


def test_a_folder_run_scores_the_same_top1_read_from_its_shards(digits_folder, digits_shards, shard_run, capsys):
    best = shard_run / "best.pth"
    from_shards = validate_checkpoint(best, workers=0)
    from_folder = validate_checkpoint(best, data_dir=str(digits_folder), workers=0)
    assert from_shards["dataset"] == "wds" and from_folder["dataset"] == "folder"
    assert from_shards["num_images"] == from_folder["num_images"] == 360
    assert from_shards["top1"] == from_folder["top1"] and from_shards["loss"] == pytest.approx(from_folder["loss"])


def test_sigkill_mid_epoch_then_resume_auto_ends_bitwise_equal(digits_shards, shard_run, tmp_path):
    from test_resume import _assert_same_run

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(dict(TINY, data_dir=str(digits_shards), workers=2, save_interval="5")))
    output = tmp_path / "killed"
    argv = ["train", "-c", str(config), "--output", str(output)]
    process = subprocess.Popen([sys.executable, "-m", "gcvimoe", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (output / "last.pth").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    saved = torch.load(output / "last.pth", weights_only=True)
    assert saved["epoch"] == 0 and saved["batch"] > 0  # killed in the middle of the first epoch
    assert main([*argv, "--resume", "auto"]) == 0
    _assert_same_run(shard_run, output)


@pytest.fixture(scope="module")
def digits_hf(tmp_path_factory):
    """100 train and 30 test digits saved with ``datasets.save_to_disk``: columns 'img' (Image) and 'digit'."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=list("0123456789"))})

    def split(name, count):
        images, labels = digits_split(name)
        return datasets.Dataset.from_dict({"img": [Image.fromarray(image) for image in images[:count]],
                                           "digit": labels[:count].tolist()}, features=features)

    path = tmp_path_factory.mktemp("hf") / "digits"
    datasets.DatasetDict({"train": split("train", 100), "test": split("val", 30)}).save_to_disk(str(path))
    return path


def test_hfds_reads_a_dataset_saved_to_disk(digits_hf):
    data_cfg = resolve_data_config(f"hfds:{digits_hf}", img_size=16)
    assert data_cfg.class_names == list("0123456789") and data_cfg.in_chans == 1
    val = create_dataset(data_cfg, "val", transform=_pixels)
    images, labels = digits_split("val")
    assert len(val) == 30 and len(create_dataset(data_cfg, "train")) == 100
    assert torch.equal(val[3][0], torch.from_numpy(images[3]).flatten()) and val[3][1] == labels[3]


@pytest.mark.parametrize("name", ["/no/such/folder", "no-such-user/no-such-dataset"])
def test_a_missing_hfds_is_one_line_and_touches_no_network(tmp_path, capsys, monkeypatch, name):
    pytest.importorskip("datasets")

    def no_network(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # a name lookup comes before any connection
    code, err = run_cli(capsys, "train", "--dataset", f"hfds:{name}", "--output", str(tmp_path / "run"))
    assert_one_error_line(code, err, f"hfds:{name}", "nothing was downloaded")


def test_shard_mistakes_are_one_line(digits_shards, tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--data-dir", str(tmp_path / "train-{000000..000003}.tar"))
    assert_one_error_line(code, err, "_info.json", "gcvimoe convert shards")
    code, err = run_cli(capsys, "train", "--data-dir", str(digits_shards / "train-{000000..000099}.tar"))
    assert_one_error_line(code, err, "train-000015.tar is not listed in")
    code, err = run_cli(capsys, "train", "--dataset", "nope")
    assert_one_error_line(code, err, "unknown dataset 'nope'", "hfds")


class Bars(ArrayImageDataset):
    def __init__(self, split, transform=None):
        rng = np.random.default_rng(split == "val")
        self.targets, self.classes, self.transform = rng.integers(0, 2, 64), ["rows", "columns"], transform
        self.images = (np.indices((8, 8))[self.targets] % 2 * 200 + rng.integers(0, 50, (64, 8, 8))).astype(np.uint8)


def test_a_toy_source_registered_in_a_few_lines_trains_and_validates(tmp_path):
    @register_source
    class BarsSource(DataSource):
        name, in_memory = "toy-bars", True

        def resolve(self, dataset, data_dir, img_size, in_chans, notes):
            return Native(["rows", "columns"], 1, 32, (0.45,), (0.4,))

        def build(self, data_cfg, split, transform=None, *args):
            return Bars(split, transform)

    try:
        result = train(build_config(None, dict(TINY, dataset="toy-bars", epochs=1, output=str(tmp_path))))
        validated = validate_checkpoint(tmp_path / "best.pth", workers=0)
    finally:
        del _SOURCES["toy-bars"]
    assert validated["dataset"] == "toy-bars" and validated["num_images"] == 64
    assert validated["top1"] == pytest.approx(result.best_top1)


def _compared_names(tree, names):
    """String constants among ``names`` that a comparison (``==``, ``in``, ...) in ``tree`` uses."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                for constant in ast.walk(operand):
                    if isinstance(constant, ast.Constant) and constant.value in names:
                        found.append((node.lineno, constant.value))
    return found


def test_no_dataset_name_is_compared_outside_the_registry():
    """Only the modules that register a source may compare against a dataset name."""
    names = set(source_names())
    offenders = {}
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if "@register_source" in text:
            continue
        found = _compared_names(ast.parse(text), names)
        if found:
            offenders[str(path.relative_to(SRC))] = found
    assert offenders == {}
    assert _compared_names(ast.parse('d = "x" if dataset == "digits" else "y"'), names) == [(1, "digits")]


def test_two_processes_by_two_workers_train_on_shards_under_torchrun(digits_shards, tmp_path, capsys):
    """DDP over 2 gloo processes with 2 loader workers each: equal batch counts (no hang), and the shard split of
    evaluation counts every val image once."""
    from test_train import torchrun_train

    args = ["--model-kwargs", "{embed_dim: 16}", "--num-experts", "4", "--img-size", "16", "--batch-size", "16",
            "--epochs", "1", "--workers", "2", "--threads", "1", "--data-dir", str(digits_shards)]
    stdout = torchrun_train(args, tmp_path / "ddp")
    assert "2 process(es) on cpu, global batch 32" in stdout
    checkpoint = torch.load(tmp_path / "ddp" / "last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["world_size"] == 2
    capsys.readouterr()
    assert main(["validate", "--checkpoint", str(tmp_path / "ddp" / "last.pth"), "--json", "--workers", "0"]) == 0
    assert '"num_images": 360' in capsys.readouterr().out


def test_the_flip_probe_samples_a_folder_but_not_a_stream(digits_folder, digits_shards):
    """The digits as a folder: mirroring costs the probe most of its accuracy, so no flips. The same images as shards
    are a stream the probe cannot sample at random: flips are assumed, and the reason says so."""
    from gcvimoe.data.flip_probe import flip_default
    hflip, why = flip_default("folder", resolve_data_config("folder", str(digits_folder)))
    assert hflip == 0.0 and why.startswith("from the data: mirrored images lose ")
    hflip, why = flip_default("wds", resolve_data_config("wds", str(digits_shards)))
    assert hflip == 0.5 and why.startswith("the data could not be probed")
