"""Distributed faults: a frozen or stuck process ends the job within --dist-timeout with one line, and sharded
(torch.distributed.checkpoint) checkpoints of an expert-parallel run load on any process count to the same tensors."""
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.optim import create_optimizer_v2

from helpers import make_image_folder

from gcvimoe.cli import main
from gcvimoe.errors import GcvimoeError
from gcvimoe.models import create_model, read_checkpoint
from gcvimoe.models.sharded import is_sharded_checkpoint
from gcvimoe.moe.parallel import shard_experts_
from gcvimoe.train.checkpointing import find_resume_checkpoint, load_training_checkpoint
from gcvimoe.train.distributed import EXIT_LOST_PROCESS, DistInfo
from gcvimoe.train.sharded_checkpoints import full_state, load_sharded, save_sharded, sharded_state

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 5  # seconds: the heartbeat names a stopped process after 80 % of it, a stuck collective fails at it

# Two processes joined by gcvimoe's own init_distributed (env://, as torchrun starts them) all-reduce in a loop;
# rank 1 then stops itself (SIGSTOP: frozen, as a debugger or a hung node leaves it) or sleeps outside any collective
# (alive: its heartbeat goes on, but rank 0's collective waits). Rank 0 must end within the timeout, with one line.
WORKER = textwrap.dedent("""
    import os, signal, sys, time
    import torch, torch.distributed as dist
    from gcvimoe.train.distributed import (
        EXIT_LOST_PROCESS, cleanup, collective_failure, init_distributed, is_collective_failure)
    torch.set_num_threads(1)
    info = init_distributed("cpu", timeout=float(sys.argv[2]))
    value = torch.ones(1)
    for step in range(1000):
        if info.rank == 1 and step == 3:
            print("frozen", flush=True)
            if sys.argv[1] == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            else:
                time.sleep(60)
        try:
            dist.all_reduce(value)
        except RuntimeError as e:
            assert is_collective_failure(e, info)
            print(f"error: {collective_failure(e, info)}", file=sys.stderr)
            cleanup(info)  # as train() does: exiting with the heartbeat thread inside a store call can abort
            sys.exit(EXIT_LOST_PROCESS)
        time.sleep(0.01)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(mode):
    """Start both ranks; returns rank 0's exit code, its stderr, and the seconds from rank 1's freeze to rank 0's
    end. Rank 1 is killed afterwards (it is this test's own process)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, mode, str(TIMEOUT)], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in range(2)]
    try:
        assert procs[1].stdout.readline().strip() == "frozen"
        frozen_at = time.monotonic()
        _, stderr = procs[0].communicate(timeout=TIMEOUT * 4)
        return procs[0].returncode, stderr, time.monotonic() - frozen_at
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_stopped_process_ends_the_job_within_the_timeout_naming_it():
    code, stderr, seconds = _run_pair("stop")
    lines = stderr.strip().splitlines()
    assert code == EXIT_LOST_PROCESS
    assert len(lines) == 1 and lines[0].startswith("error: process 1 of 2 (rank 1) has given no sign of life"), stderr
    assert "--resume auto" in lines[0]
    assert seconds < TIMEOUT + 1  # the heartbeat fires before the collective's own timeout


def test_a_collective_that_waits_for_a_live_process_ends_at_the_timeout_naming_the_collective():
    code, stderr, seconds = _run_pair("sleep")
    lines = stderr.strip().splitlines()
    assert code == EXIT_LOST_PROCESS
    assert len(lines) == 1 and lines[0].startswith("error: a collective of process 0 of 2 failed (--dist-timeout 5 s)"), \
        stderr
    assert TIMEOUT - 1 < seconds < TIMEOUT + 3


# Sharded checkpoints: a 2-process expert-parallel model with AdamW state and an EMA copy is saved with DCP, then
# loaded by 1 process (no process group) and by 4 expert-parallel processes. Every tensor, gathered, must equal the
# 2-process job's gathered state exactly.
def _model():
    torch.manual_seed(0)
    return create_model("gcvimoe_nano", num_experts=4, embed_dim=16, num_classes=3, img_size=32, in_chans=3)


def _optimizer(model):
    return create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05)


def _init(rank, world_size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    return DistInfo(device=torch.device("cpu"), rank=rank, world_size=world_size)


def _save_worker(rank, init_file, folder):
    info = _init(rank, 2, init_file)
    try:
        model = shard_experts_(_model())
        ema = shard_experts_(_model())
        optimizer = _optimizer(model)
        generator = torch.Generator().manual_seed(1)  # the shared weights' gradients agree, as after DDP's all-reduce
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator) + rank * getattr(param, "is_expert", False)
        optimizer.step()
        with torch.no_grad():
            for param in ema.parameters():
                param.add_(1.0)
        tensors, optimizer_rest = sharded_state(model, optimizer, ema, info)
        training = {"model_name": "gcvimoe_nano", "model_args": model.model_args, "data_config": None, "epoch": 1,
                    "optimizer": optimizer_rest}
        save_sharded(folder / "last", tensors, training, info)
        reference = full_state(model, optimizer, ema, info)
        if info.is_primary:
            torch.save(reference, folder / "reference.pth")
        dist.barrier()  # a process that tears gloo down while a peer still works can abort (SIGABRT)
    finally:
        dist.destroy_process_group()


def _load_worker(rank, world_size, init_file, folder):
    info = _init(rank, world_size, init_file)
    try:
        model, ema = shard_experts_(_model()), shard_experts_(_model())
        optimizer = _optimizer(model)
        rest = torch.load(folder / "last" / "training.pth", weights_only=True)["optimizer"]
        load_sharded(folder / "last", model, optimizer, ema, rest, info)
        loaded = full_state(model, optimizer, ema, info)
        if info.is_primary:
            torch.save(loaded, folder / f"loaded-{world_size}.pth")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _assert_equal_states(state, reference):
    for key in ("state_dict", "ema_state_dict"):
        assert state[key].keys() == reference[key].keys()
        for name, value in reference[key].items():
            assert torch.equal(state[key][name], value), f"{key} {name}"
    assert state["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    assert state["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    for index, entry in reference["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(state["optimizer"]["state"][index][name], value), f"optimizer {index} {name}"


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    mp.start_processes(_save_worker, args=(str(folder / "store"), folder), nprocs=2, start_method="spawn")
    return folder


def test_a_sharded_checkpoint_has_every_process_write_its_own_experts(sharded_folder):
    last = sharded_folder / "last"
    assert is_sharded_checkpoint(last)
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(sharded_folder.glob(".last*"))  # the temporary folder was renamed into place
    # each process's file holds its own experts (half of the experts' bytes each), the shared weights once
    sizes = [p.stat().st_size for p in sorted(last.glob("*.distcp"))]
    expert_bytes = sum(v.numel() * v.element_size() for k, v in _model().state_dict().items() if ".experts." in k)
    assert min(sizes) > expert_bytes  # weights, EMA and two Adam moments: each well above one half


def test_a_sharded_checkpoint_loads_in_one_process_to_the_same_weights(sharded_folder):
    reference = torch.load(sharded_folder / "reference.pth", weights_only=True)
    model, ema = _model(), _model()
    optimizer = _optimizer(model)
    rest = torch.load(sharded_folder / "last" / "training.pth", weights_only=True)["optimizer"]
    load_sharded(sharded_folder / "last", model, optimizer, ema, rest, DistInfo(device=torch.device("cpu")))
    _assert_equal_states(full_state(model, optimizer, ema, DistInfo(device=torch.device("cpu"))), reference)


def test_a_sharded_checkpoint_reshards_onto_four_processes(sharded_folder):
    mp.start_processes(_load_worker, args=(4, str(sharded_folder / "store4"), sharded_folder), nprocs=4,
                       start_method="spawn")
    reference = torch.load(sharded_folder / "reference.pth", weights_only=True)
    _assert_equal_states(torch.load(sharded_folder / "loaded-4.pth", weights_only=True), reference)


def test_a_sharded_checkpoint_reads_whole_for_export_and_is_found_by_resume(sharded_folder):
    reference = torch.load(sharded_folder / "reference.pth", weights_only=True)
    checkpoint = read_checkpoint(sharded_folder / "last")
    for name, value in reference["state_dict"].items():
        assert torch.equal(checkpoint.state_dict[name], value), name
    assert find_resume_checkpoint("auto", str(sharded_folder)) == sharded_folder / "last"
    state = load_training_checkpoint(sharded_folder / "last")
    assert "state_dict" not in state  # the tensors are read later, each process its own share


def test_a_sharded_checkpoint_index_never_runs_code(tmp_path, sharded_folder):
    folder = tmp_path / "last"
    shutil.copytree(sharded_folder / "last", folder)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))
    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(GcvimoeError, match="cannot read the index"):
        read_checkpoint(folder)
    assert not (tmp_path / "ran").exists()


# The whole command: an expert-parallel torchrun job saves sharded folders by default, keeps the newest --keep-last
# checkpoint-<epoch>/ folders, writes the model folder from best/, and its last/ resumes in one process with
# --resume auto.
TINY = ["--model", "gcvimoe_nano", "--model-kwargs", "{embed_dim: 16}", "--num-experts", "4", "--img-size", "32",
        "--batch-size", "4", "--warmup-epochs", "0", "--lr", "1e-3", "--workers", "0", "--threads", "1",
        "--no-tensorboard"]


def test_an_expert_parallel_run_saves_sharded_and_resumes_on_one_process(tmp_path, capsys):
    data = make_image_folder(tmp_path / "images", train_per_class=4, val_per_class=2)
    output = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "gcvimoe", "train", *TINY, "--epochs", "3", "--data-dir", str(data), "--expert-parallel",
               "--checkpoint-every", "1", "--keep-last", "2", "--output", str(output)]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert is_sharded_checkpoint(output / "last") and is_sharded_checkpoint(output / "best")
    assert not (output / "last.pth").exists()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert all(is_sharded_checkpoint(output / name) for name in ("checkpoint-2", "checkpoint-3"))
    assert read_checkpoint(output / "checkpoint-3").training["epoch"] == 3
    assert (output / "model" / "model.safetensors").is_file()
    assert main(["train", *TINY, "--epochs", "4", "--data-dir", str(data), "--output", str(output),
                 "--resume", "auto"]) == 0
    assert "resumed after epoch 3" in capsys.readouterr().out
    # one process saves a file (checkpoint_format auto), which --resume auto now prefers as the newer
    assert find_resume_checkpoint("auto", str(output)) == output / "last.pth"
    assert read_checkpoint(output / "last.pth").training["epoch"] == 4
