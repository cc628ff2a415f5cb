"""Preemption-safe training: an epoch resumed at any batch sees the same images, and a run stopped mid-epoch by a
signal or a save interval, then resumed, ends bitwise equal to an uninterrupted one."""
import pytest
import torch

from gcvimoe.data import batches_per_epoch, build_transform, create_dataset, create_loader, resolve_data_config, set_epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_started_at_a_batch_sees_the_same_augmented_images(workers):
    data_cfg = resolve_data_config("digits", img_size=16)
    dataset = create_dataset(data_cfg, "train", build_transform(data_cfg, is_training=True, scale=(0.5, 1.0),
                                                                  hflip=0.5))
    loader = create_loader(dataset, batch_size=64, is_training=True, workers=workers, seed=3)
    set_epoch(loader, 2, seed=3)
    torch.manual_seed(0)
    whole = [(images.clone(), targets.clone()) for images, targets in loader]
    set_epoch(loader, 2, seed=3, start_batch=5)
    torch.manual_seed(1)  # the caller's stream does not matter: each sample has its own
    rest = list(loader)
    assert len(rest) == len(whole) - 5 and batches_per_epoch(loader) == len(whole)
    for (images, targets), (expected_images, expected_targets) in zip(rest, whole[5:], strict=True):
        assert torch.equal(targets, expected_targets) and torch.equal(images, expected_images)
    set_epoch(loader, 3, seed=3)
    assert not torch.equal(next(iter(loader))[0], whole[0][0])  # another epoch, other crops


import csv  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

from gcvimoe.train import build_config, train  # noqa: E402
from gcvimoe.train.durations import parse_save_interval  # noqa: E402
from gcvimoe.train.preemption import Preempted  # noqa: E402
from gcvimoe.train.checkpointing import load_training_checkpoint  # noqa: E402
from gcvimoe.train.run import Callback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DIGITS = {"model_kwargs": {"embed_dim": 16}, "img_size": 16, "batch_size": 48, "epochs": 2, "warmup_epochs": 1,
          "threads": 1, "workers": 0, "tensorboard": False, "log_interval": 3, "hflip": 0.5,
          "moe": {"num_experts": 4}}


class StopAt(Callback):
    """Sends a signal to this process, or raises, when a given micro-batch of a given epoch is reported."""

    def __init__(self, epoch, batch, signum=None):
        self.epoch, self.batch, self.signum, self.done = epoch, batch, signum, False

    def on_step_end(self, run, epoch, batch_idx, record):
        if (epoch, batch_idx) >= (self.epoch, self.batch) and not self.done:
            self.done = True
            if self.signum is None:
                raise RuntimeError("killed")
            os.kill(os.getpid(), self.signum)


def _run(output, callbacks=(), resume=False, **overrides):
    cfg = build_config(None, dict(DIGITS, output=str(output), **overrides))
    return train(cfg, resume=load_training_checkpoint(output / "last.pth") if resume else None, callbacks=callbacks)


def _summary(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(f)]


def _assert_same_run(a, b):
    last_a, last_b = (torch.load(p / "last.pth", weights_only=True) for p in (a, b))
    for key in last_a["state_dict"]:
        assert torch.equal(last_a["state_dict"][key], last_b["state_dict"][key]), key
    for state_a, state_b in zip(last_a["optimizer"]["state"].values(), last_b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    best_a, best_b = (torch.load(p / "best.pth", weights_only=True)["state_dict"] for p in (a, b))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert _summary(a / "summary.csv") == _summary(b / "summary.csv")
    assert not [p for p in b.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    output = tmp_path_factory.mktemp("reference")
    _run(output, save_interval="5")
    return output


def test_sigterm_mid_epoch_saves_stops_and_resumes_bitwise(reference, tmp_path):
    with pytest.raises(Preempted, match="stopped by SIGTERM in epoch 1 after batch") as stop:
        _run(tmp_path, callbacks=[StopAt(0, 10, signal.SIGTERM)], save_interval="5")
    assert stop.value.exit_code == 128 + signal.SIGTERM
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    assert saved["epoch"] == 0 and saved["batch"] > 10 and _summary(tmp_path / "summary.csv") == []
    _run(tmp_path, resume=True, save_interval="5")
    _assert_same_run(reference, tmp_path)


def test_a_crash_resumes_from_the_last_interval_save_bitwise(reference, tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, callbacks=[StopAt(1, 12)], save_interval="5")
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["batch"] == 11 and saved["step"] == 29 + 11  # steps 5, 10, ...: 40
    _run(tmp_path, resume=True, save_interval="5")
    _assert_same_run(reference, tmp_path)


def test_save_interval_forms():
    assert parse_save_interval("500") == (500, 0.0)
    assert parse_save_interval("10m") == (0, 600.0) and parse_save_interval("90s") == (0, 90.0)
    assert parse_save_interval("") == (0, 0.0)
    for bad in ("10 minutes", "1.5", "-3"):
        with pytest.raises(ValueError, match="--save-interval"):
            parse_save_interval(bad)


def test_tensorboard_keeps_no_step_twice_after_a_resume(tmp_path):
    """The killed run logged steps past its last save; the resumed run re-runs them, and TensorBoard keeps one copy."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, callbacks=[StopAt(1, 12)], save_interval="5", tensorboard=True, epochs=2)
    _run(tmp_path, resume=True, save_interval="5", tensorboard=True, epochs=2)
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    steps = [event.step for event in events.Scalars("step/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * 29
    assert [event.step for event in events.Scalars("epoch/eval_top1")] == [1, 2]
