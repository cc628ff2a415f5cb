"""End-to-end training on a tiny generated image folder: outputs, exact resume, validate/predict, and DDP."""
import datetime
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.optim import create_optimizer_v2

from gcvimoe.cli import main
from helpers import CLASSES, read_summary
from gcvimoe.data import create_loader
from gcvimoe.models import model_from_checkpoint
from gcvimoe.train.config import build_config
from gcvimoe.train.distributed import DistInfo, check_expert_parallel_optimizer
from gcvimoe.train.evaluate import evaluate
from gcvimoe.train.checkpointing import EMA_COLUMNS, SUMMARY_COLUMNS
from gcvimoe.train.trainer import check_finite_loss
from gcvimoe.errors import GcvimoeError
from gcvimoe.models import create_model
from gcvimoe.moe.parallel import shard_experts_

# a half-width nano with 4 experts, CutMix and EMA: every state a resume must restore, a few seconds per epoch
TINY = ["--model", "gcvimoe_nano", "--model-kwargs", "{embed_dim: 16}", "--num-experts", "4", "--img-size", "32",
        "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1", "--lr", "1e-3", "--workers", "0",
        "--scale", "0.8,1", "--cutmix", "1.0", "--ema", "--ema-decay", "0.9", "--threads", "1",
        "--hflip", "0", "--drop-path-rate", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_a(data_dir, tmp_path_factory):
    """An uninterrupted 2-epoch run that also keeps its epoch-1 checkpoint."""
    output = tmp_path_factory.mktemp("run_a")
    assert main(["train", *TINY, "--data-dir", str(data_dir), "--output", str(output), "--checkpoint-every", "1",
                 "--lr-batch-size", "4"]) == 0
    return output


def test_two_epoch_run_writes_every_output(run_a):
    for name in ("config.yaml", "summary.csv", "last.pth", "best.pth", "checkpoint-1.pth", "checkpoint-2.pth",
                 "train.log", "curves.png", "expert_usage.png"):
        assert (run_a / name).is_file() and (run_a / name).stat().st_size > 0, name
    assert not list(run_a.glob(".*.tmp"))

    rows = read_summary(run_a / "summary.csv")
    assert list(rows[0]) == list(SUMMARY_COLUMNS + EMA_COLUMNS)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(float(row["train_aux_loss"]) > 0 for row in rows)  # the MoE aux loss is logged on its own
    assert "epoch   2/2" in (run_a / "train.log").read_text()

    saved = build_config(run_a / "config.yaml")
    assert saved.epochs == 2 and saved.moe.num_experts == 4 and saved.model_kwargs == {"embed_dim": 16}

    checkpoint = torch.load(run_a / "last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["class_names"] == list(CLASSES)
    assert checkpoint["model_args"]["moe"]["num_experts"] == 4 and checkpoint["data_config"]["in_chans"] == 3
    for key in ("optimizer", "scheduler", "rng", "history", "config", "step"):
        assert checkpoint[key] is not None, key
    model = model_from_checkpoint(run_a / "last.pth")
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, len(CLASSES))


def test_resume_after_epoch_one_matches_uninterrupted_run(run_a, tmp_path):
    output = tmp_path / "resumed"
    assert main(["train", "--resume", str(run_a / "checkpoint-1.pth"), "--output", str(output)]) == 0
    resumed = torch.load(output / "last.pth", map_location="cpu", weights_only=True)
    uninterrupted = torch.load(run_a / "last.pth", map_location="cpu", weights_only=True)
    assert resumed["step"] == uninterrupted["step"]
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys()
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for key, value in uninterrupted["ema_state_dict"].items():
        assert torch.equal(resumed["ema_state_dict"][key], value), key
    for key, state in uninterrupted["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["exp_avg"], state["exp_avg"])
    columns = [c for c in SUMMARY_COLUMNS + EMA_COLUMNS if c != "images_per_s"]
    expected = [{c: row[c] for c in columns} for row in read_summary(run_a / "summary.csv")]
    assert [{c: row[c] for c in columns} for row in read_summary(output / "summary.csv")] == expected


def test_resume_auto_picks_the_output_folders_last_checkpoint(run_a, tmp_path, capsys):
    shutil.copy(run_a / "last.pth", tmp_path / "last.pth")
    assert main(["train", "--resume", "auto", "--output", str(tmp_path)]) == 0  # already at its last epoch
    assert "resumed after epoch 2" in capsys.readouterr().out
    assert (tmp_path / "curves.png").is_file()


def test_validate_json_reproduces_last_eval(run_a, capsys):
    capsys.readouterr()
    assert main(["validate", "--checkpoint", str(run_a / "last.pth"), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    last = read_summary(run_a / "summary.csv")[-1]
    assert result["top1"] == pytest.approx(float(last["eval_top1"]), abs=1e-4)
    assert result["top5"] == pytest.approx(float(last["eval_top5"]), abs=1e-4)
    assert result["loss"] == pytest.approx(float(last["eval_loss"]), rel=1e-5)
    assert result["num_images"] == 9 and len(result["per_class_top1"]) == 3
    assert len(result["experts"]) > 0 and all(len(v["tokens_per_expert"]) == 4 for v in result["experts"].values())
    assert main(["validate", "--checkpoint", str(run_a / "last.pth"), "--workers", "0"]) == 0
    assert "per-class top-1" in capsys.readouterr().out


def test_predict_gives_class_names_and_probabilities(run_a, data_dir, capsys):
    image = data_dir / "val" / "square" / "0.png"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_a / "best.pth"), "--json", str(image)]) == 0
    result = json.loads(capsys.readouterr().out)
    labels = [entry["label"] for entry in result["top"]]
    assert sorted(labels) == sorted(CLASSES)  # top-5 of 3 classes: all of them, each once
    assert sum(entry["probability"] for entry in result["top"]) == pytest.approx(1.0, abs=1e-5)


def torchrun_train(args, output):
    """``gcvimoe train`` in 2 gloo processes; returns what it printed."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "gcvimoe", "train", *args, "--output", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_torchrun_two_processes_gloo(run_a, data_dir, tmp_path, capsys):
    output = tmp_path / "ddp"
    stdout = torchrun_train([*TINY, "--epochs", "1", "--data-dir", str(data_dir), "--lr-batch-size", "4"], output)
    assert "2 process(es) on cpu, global batch 8" in stdout

    rows = read_summary(output / "summary.csv")
    assert list(rows[0]) == list(read_summary(run_a / "summary.csv")[0])
    assert len(rows) == 1
    checkpoint = torch.load(output / "last.pth", map_location="cpu", weights_only=True)
    single = torch.load(run_a / "last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    # the peak LR follows the global batch: twice the single-process batch, twice the LR
    assert checkpoint["scheduler"]["base_values"][0] == pytest.approx(2 * single["scheduler"]["base_values"][0])
    # evaluation is sharded over the processes but counts every val image once
    capsys.readouterr()
    assert main(["validate", "--checkpoint", str(output / "last.pth"), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 9
    assert result["top1"] == pytest.approx(float(rows[-1]["eval_top1"]), abs=1e-4)


@pytest.mark.slow
def test_torchrun_compile_trains_as_the_eager_ddp_run(data_dir, tmp_path):
    """``train --compile`` under torchrun (DDP, 2 gloo processes) trains the weights the eager DDP run trains. No
    expert dropout: the compiled graph draws its random numbers in its own way."""
    args = [*TINY, "--epochs", "1", "--data-dir", str(data_dir), "--expert-dropout", "0"]
    torchrun_train(args, tmp_path / "eager")
    torchrun_train([*args, "--compile"], tmp_path / "compiled")
    eager, compiled = (torch.load(tmp_path / name / "last.pth", map_location="cpu", weights_only=True)
                       for name in ("eager", "compiled"))
    for name, value in eager["state_dict"].items():
        torch.testing.assert_close(compiled["state_dict"][name], value, rtol=1e-3, atol=1e-4, msg=name)
    eager_row, compiled_row = (read_summary(tmp_path / name / "summary.csv")[0] for name in ("eager", "compiled"))
    assert float(compiled_row["train_loss"]) == pytest.approx(float(eager_row["train_loss"]), rel=1e-4)


# Expert-parallel twins of a DDP run: without expert dropout, whose masks are drawn on the process that computes a
# row, the two must train the same weights. SGD keeps rounding differences small, and the small clipping threshold
# clips every step, so the clipping norm must be the whole job's.
TWINS = [*TINY, "--expert-dropout", "0", "--opt", "sgd", "--lr", "0.5", "--clip-grad", "0.1"]


def assert_same_training(run, reference):
    checkpoint = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    expected = torch.load(reference / "last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["step"] == expected["step"]
    for key in ("state_dict", "ema_state_dict"):
        assert checkpoint[key].keys() == expected[key].keys()
        for name, value in expected[key].items():  # every expert, also from the sharded run
            torch.testing.assert_close(checkpoint[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    for index, state in expected["optimizer"]["state"].items():
        torch.testing.assert_close(checkpoint["optimizer"]["state"][index]["momentum_buffer"],
                                   state["momentum_buffer"], rtol=1e-5, atol=1e-6)
    rows, expected_rows = read_summary(run / "summary.csv"), read_summary(reference / "summary.csv")
    for row, expected_row in zip(rows, expected_rows, strict=True):
        for column in ("train_loss", "train_aux_loss", "eval_loss", "eval_top1", "ema_eval_loss"):
            assert float(row[column]) == pytest.approx(float(expected_row[column]), rel=1e-5, abs=1e-6), column


@pytest.fixture(scope="module")
def ddp_twin(data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp_twin")
    torchrun_train([*TWINS, "--data-dir", str(data_dir), "--checkpoint-every", "1"], output)
    return output


def test_expert_parallel_trains_as_ddp(ddp_twin, data_dir, tmp_path, capsys):
    output = tmp_path / "expert_parallel"
    stdout = torchrun_train([*TWINS, "--data-dir", str(data_dir), "--expert-parallel", "--checkpoint-format", "file"],
                            output)
    assert "every process holds 1/2 of each MoE layer's experts" in stdout
    assert_same_training(output, ddp_twin)
    # the val shares are 5 and 4 images (2 and 1 batches): the process with fewer batches joins the others'
    # all-to-alls, and every image is counted once, as a single process on the saved checkpoint counts it
    capsys.readouterr()
    assert main(["validate", "--checkpoint", str(output / "last.pth"), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    last = read_summary(output / "summary.csv")[-1]
    assert result["num_images"] == 9
    assert result["loss"] == pytest.approx(float(last["eval_loss"]), rel=1e-5)


def test_expert_parallel_resumes_a_checkpoint_with_every_expert(ddp_twin, tmp_path):
    output = tmp_path / "resumed"
    torchrun_train(["--resume", str(ddp_twin / "checkpoint-1.pth"), "--expert-parallel", "--checkpoint-format",
                    "file"], output)
    assert_same_training(output, ddp_twin)


def test_expert_parallel_needs_a_process_count_dividing_the_experts(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
               "-m", "gcvimoe", "train", *TINY, "--data-dir", str(data_dir), "--expert-parallel",
               "--output", str(tmp_path / "run")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "num_experts=4 must be divisible by the 3 expert-parallel processes" in done.stderr


def _loss_worker(rank, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        info = DistInfo(device=torch.device("cpu"), rank=rank, world_size=2)
        check_finite_loss(torch.tensor(1.5), info, "at batch 0")  # finite everywhere: nobody stops
        with pytest.raises(GcvimoeError, match="on at least one of the 2 processes at batch 1"):
            check_finite_loss(torch.tensor(float("nan") if rank == 1 else 2.0), info, "at batch 1")
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    mp.start_processes(_loss_worker, args=(str(tmp_path / "store"),), nprocs=2, start_method="spawn")


def _evaluate_worker(rank, init_file):
    torch.set_num_threads(1)
    # a short timeout: a process left waiting in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                           timeout=datetime.timedelta(seconds=60))
    try:
        info = DistInfo(device=torch.device("cpu"), rank=rank, world_size=2)
        torch.manual_seed(0)
        model = create_model("gcvimoe_nano", num_experts=4, embed_dim=16, num_classes=3, img_size=32, in_chans=3)
        shard_experts_(model)
        generator = torch.Generator().manual_seed(1)
        dataset = torch.utils.data.TensorDataset(torch.randn(1, 3, 32, 32, generator=generator), torch.tensor([2]))
        loader = create_loader(dataset, 4, False, rank=rank, world_size=2)  # one image: process 1 gets none
        result = evaluate(model, loader, num_classes=3, info=info)
        assert result["num_images"] == 1
        counts = {name: layer["token_counts"] for name, layer in result["experts"].items()}
        assert counts and all(sum(layer) > 0 for layer in counts.values())
        gathered = [None, None]
        dist.all_gather_object(gathered, (result["loss"], counts))
        assert gathered[0] == gathered[1]  # every process reports the whole val set's numbers
    finally:
        dist.destroy_process_group()


def test_expert_parallel_evaluation_with_a_process_without_images(tmp_path):
    mp.start_processes(_evaluate_worker, args=(str(tmp_path / "store"),), nprocs=2, start_method="spawn")


def test_expert_parallel_refuses_optimisers_that_look_across_parameters():
    params = [torch.nn.Parameter(torch.zeros(2, 3))]
    check_expert_parallel_optimizer(create_optimizer_v2(params, "adamw"), "adamw")
    for name in ("lamb", "adafactor"):
        with pytest.raises(GcvimoeError, match=f"expert_parallel cannot train with --opt {name}"):
            check_expert_parallel_optimizer(create_optimizer_v2(params, name), name)
