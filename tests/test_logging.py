"""What a run shows while it trains: step lines, no carriage returns off a terminal, TensorBoard and W&B scalars."""
import contextlib
import importlib.util
import io
import json
import sys

import pytest
import torch

from gcvimoe.cli import main
from helpers import make_image_folder, read_summary
from gcvimoe.train import trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# a half-width nano with 4 experts on 12 training images in batches of 2: 6 micro-batches per epoch
TINY = ["--model", "gcvimoe_nano", "--model-kwargs", "{embed_dim: 16}", "--num-experts", "4",
        "--img-size", "32", "--batch-size", "2", "--warmup-epochs", "1", "--lr", "1e-3", "--workers", "0",
        "--threads", "1"]
BATCHES = 6
# --log-interval 2: the first micro-batch, every second one and the last
LOG_STEPS = [1, 2, 4, 6]
WINDOWS = [1, 1, 2, 2]  # micro-batches each logged step covers


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def train_captured(args, stderr=None):
    """``gcvimoe train`` with stdout and stderr captured (stderr is not a terminal unless given one)."""
    stdout, stderr = io.StringIO(), stderr or io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train", *args])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), val_per_class=2, classes=("circle", "stripes"))


@pytest.fixture(scope="module")
def logged_run(data_dir, tmp_path_factory):
    """Two epochs with --log-interval 2 and stderr not a terminal: the output folder and what was printed."""
    pytest.importorskip("tensorboard")
    output = tmp_path_factory.mktemp("run")
    code, stdout, stderr = train_captured([*TINY, "--epochs", "2", "--log-interval", "2", "--data-dir", str(data_dir),
                                           "--output", str(output)])
    assert code == 0, stderr
    return output, stdout, stderr


def step_lines(text):
    return [line for line in text.splitlines() if " step " in f" {line}" and "| loss " in line]


def test_step_lines_go_to_stdout_and_train_log_without_carriage_returns(logged_run):
    output, stdout, stderr = logged_run
    log = (output / "train.log").read_text()
    lines = step_lines(log)
    assert [line.split(" step ")[1].split(" epoch ")[0].strip() for line in lines] == [
        f"{step}/{BATCHES}" for step in LOG_STEPS] * 2
    assert all(f" epoch {epoch}/2 |" in line for lines_of, epoch in ((lines[:4], 1), (lines[4:], 2))
               for line in lines_of)
    for field in ("| loss ", " aux ", "| lr ", "| dropped ", " img/s | eta "):
        assert all(field in line for line in lines), field
    assert len(step_lines(stdout)) == len(lines)
    assert "\r" not in stdout and "\r" not in stderr and "\r" not in log


def _scalars(output, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}, events.Tags()["scalars"]


def test_tensorboard_holds_the_step_and_epoch_scalars(logged_run):
    output, _, _ = logged_run
    rows = read_summary(output / "summary.csv")
    losses, tags = _scalars(output, "step/loss")
    steps = [epoch * BATCHES + step for epoch in range(2) for step in LOG_STEPS]
    assert sorted(losses) == steps  # at the log steps only, never every step
    for tag in ("step/aux_loss", "step/lr", "step/images_per_s", "step/dropped_fraction"):
        assert sorted(_scalars(output, tag)[0]) == steps, tag
    lrs = _scalars(output, "step/lr")[0]
    aux_losses = _scalars(output, "step/aux_loss")[0]
    for epoch, row in enumerate(rows):
        # the epoch's loss is the mean of its micro-batches: the logged windows, weighted by their length
        window_steps = [epoch * BATCHES + step for step in LOG_STEPS]
        mean_loss = sum(losses[s] * w for s, w in zip(window_steps, WINDOWS)) / BATCHES
        mean_aux = sum(aux_losses[s] * w for s, w in zip(window_steps, WINDOWS)) / BATCHES
        assert mean_loss == pytest.approx(float(row["train_loss"]), rel=1e-5)
        assert mean_aux == pytest.approx(float(row["train_aux_loss"]), rel=1e-5)
        assert lrs[window_steps[-1]] == pytest.approx(float(row["lr"]), rel=1e-6)  # the LR after the epoch's update
        for column in ("train_loss", "eval_loss", "eval_top1", "lr", "dropped_fraction", "images_per_s"):
            values, _ = _scalars(output, f"epoch/{column}")
            assert values[epoch + 1] == pytest.approx(float(row[column]), rel=1e-6, abs=1e-7), column
    layers = {tag.split("/")[2] for tag in tags if tag.startswith("epoch/experts/")}
    assert layers == {tag.split("/")[2] for tag in tags if tag.startswith("step/experts/")}
    assert len(layers) == 4  # one MoE layer per stage
    for layer in layers:
        assert sorted(_scalars(output, f"step/experts/{layer}/load_cv")[0]) == steps
        max_load = _scalars(output, f"epoch/experts/{layer}/max_load")[0]
        assert sorted(max_load) == [1, 2] and all(1.0 <= value <= 4.0 for value in max_load.values())


def test_evaluation_expert_load_matches_validate(logged_run, capsys):
    output, _, _ = logged_run
    capsys.readouterr()
    assert main(["validate", "--checkpoint", str(output / "last.pth"), "--json", "--workers", "0"]) == 0
    experts = json.loads(capsys.readouterr().out)["experts"]
    for name, layer in experts.items():
        counts = torch.tensor(layer["token_counts"], dtype=torch.float64)
        load_cv = float(counts.std(correction=0) / counts.mean())  # by hand: std over mean
        logged, _ = _scalars(output, f"epoch/eval_experts/{name}/load_cv")
        assert logged[2] == pytest.approx(load_cv, rel=1e-6)
        assert _scalars(output, f"epoch/eval_experts/{name}/max_load")[0][2] == pytest.approx(
            float(counts.max() / counts.mean()), rel=1e-6)


def test_a_terminal_gets_a_bar_and_a_missing_tensorboard_one_line(data_dir, tmp_path, monkeypatch):
    """The control of the no-carriage-return test: on a terminal the bar is drawn, so the check can fail."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now fails
    output = tmp_path / "run"
    code, stdout, stderr = train_captured([*TINY, "--epochs", "1", "--log-interval", "3", "--data-dir", str(data_dir),
                                           "--output", str(output)], stderr=FakeTerminal())
    assert code == 0, stderr
    assert "\r" in stderr and "epoch 1/1" in stderr
    log = (output / "train.log").read_text()
    assert len(step_lines(log)) == 3  # micro-batches 1, 3 and 6
    assert "tensorboard: not installed" in stdout and not (output / "tensorboard").exists()


def test_a_non_finite_loss_stops_at_the_next_log_step_before_any_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    collect_aux_loss = trainer.collect_aux_loss
    calls = []

    def nan_from_the_third_batch(model):
        calls.append(None)
        loss = collect_aux_loss(model)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(trainer, "collect_aux_loss", nan_from_the_third_batch)
    output = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--log-interval", "4", "--no-tensorboard", "--data-dir",
                 str(data_dir), "--output", str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("error: the loss became nan in epoch 1, batches 2 to 4; lower --lr or raise --warmup-epochs")
    assert len(calls) == 4 and not (output / "last.pth").exists()


def test_log_wandb_offline(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "run"
    code, stdout, stderr = train_captured([*TINY, "--epochs", "1", "--no-tensorboard", "--log-wandb", "--data-dir",
                                           str(data_dir), "--output", str(output)])
    assert code == 0, stderr
    if importlib.util.find_spec("wandb") is None:
        assert "log_wandb: wandb is not installed" in stdout
        return
    import wandb
    wandb.teardown()  # the wandb service writes the run file behind run.finish(); its shutdown waits for the file
    runs = list((output / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # the offline run file holds each logged key and its value as JSON text
    record = runs[0].read_bytes()
    last = torch.load(output / "last.pth", map_location="cpu", weights_only=True)["history"][-1]
    for key in ("train_loss", "eval_loss"):
        assert f"epoch/{key}".encode() in record and json.dumps(last[key]).encode() in record, key
    assert b"step/loss" in record and b"step/experts/" in record


def test_no_tensorboard_turns_the_default_off(capsys):
    assert main(["train", "--print-config"]) == 0
    assert "tensorboard: true" in capsys.readouterr().out
    assert main(["train", "--no-tensorboard", "--print-config"]) == 0
    assert "tensorboard: false" in capsys.readouterr().out


class StepRecords:
    def __init__(self):
        self.records = []

    def on_step_end(self, run, epoch, batch_idx, record):
        self.records.append((epoch, batch_idx, record))

    def on_epoch_end(self, run, state, eval_result):
        pass

    def on_train_end(self, run, state, eval_result):
        pass


def test_callbacks_get_every_micro_batch_in_order_with_its_own_loss(data_dir, tmp_path):
    """The losses are read at log steps only, but every micro-batch still reaches the callbacks with its own loss."""
    from gcvimoe.train import build_config, train
    cfg = build_config(None, {"model": "gcvimoe_nano", "model_kwargs": {"embed_dim": 16}, "moe": {"num_experts": 4},
                              "img_size": 32, "batch_size": 2, "epochs": 2, "warmup_epochs": 1, "lr": 1e-3,
                              "log_interval": 4, "tensorboard": False, "data_dir": str(data_dir),
                              "output": str(tmp_path / "run")})
    recorder = StepRecords()
    result = train(cfg, callbacks=[recorder])
    assert [(epoch, batch_idx) for epoch, batch_idx, _ in recorder.records] == [
        (epoch, batch_idx) for epoch in range(2) for batch_idx in range(BATCHES)]
    for epoch, row in enumerate(result.history):
        records = [record for e, _, record in recorder.records if e == epoch]
        assert sum(r["loss"] for r in records) / BATCHES == pytest.approx(row["train_loss"], rel=1e-6)
        assert sum(r["aux_loss"] for r in records) / BATCHES == pytest.approx(row["train_aux_loss"], rel=1e-6)
        assert records[-1]["lr"] == row["lr"]
        assert all(a["lr"] != b["lr"] for a, b in zip(records, records[1:]))  # a new LR every update


def test_a_resumed_epoch_counts_only_the_images_it_trained_for_its_throughput(monkeypatch):
    """An epoch resumed after 30 of its 40 micro-batches: 10 batches of 8 images in 2 s are 40 img/s, not the 320
    images of the whole epoch over those 2 s."""
    from gcvimoe.moe import MoEReport
    from gcvimoe.train import progress
    from gcvimoe.train.distributed import DistInfo

    clock = iter([100.0, 102.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    meter = progress.StepMeter(torch.nn.Linear(2, 2), DistInfo(device=torch.device("cpu")), num_batches=40,
                               interval=40, epoch=0, total_epochs=1)
    meter.resume(30, [[30 * 8 * 0.5, 0.0, 30 * 8.0]], rank=0)
    for _ in range(10):
        meter.update(torch.tensor(0.5), torch.tensor(0.0), 8, MoEReport(torch.tensor(0.0), {}, {}), 1e-3)
    meter.read(39)
    stats, _ = meter.epoch_stats()
    assert stats["images_per_s"] == pytest.approx(80 / 2.0)
    assert stats["train_loss"] == pytest.approx(0.5)
