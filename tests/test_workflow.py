"""The user's workflow around training: initial weights and upcycling, model folders timm loads, validate and
predict on any checkpoint form, run folders that are never overwritten silently, device errors."""
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
import torch
from helpers import CLASSES, assert_one_error_line, read_summary, run_cli

from gcvimoe.cli import main
from gcvimoe.data import build_transform, create_dataset, create_loader, resolve_data_config
from gcvimoe.models import build_model, create_model, read_checkpoint, save_model
from gcvimoe.moe import moe_layers
from gcvimoe.train import build_config, train
from gcvimoe.train.distributed import DistInfo
from gcvimoe.train.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

NANO = {"model": "gcvimoe_nano", "model_kwargs": {"embed_dim": 16}, "img_size": 32, "batch_size": 6, "workers": 0,
        "threads": 1, "warmup_epochs": 0, "lr": 2e-3, "scale": [0.8, 1.0]}


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """A finished 2-epoch MoE run with EMA, an epoch checkpoint every epoch and only the newest one kept."""
    output = tmp_path_factory.mktemp("run")
    cfg = build_config(None, dict(NANO, data_dir=str(data_dir), epochs=2, output=str(output), ema=True,
                                  ema_decay=0.5, checkpoint_every=1, keep_last=1, tensorboard=False))
    cfg.moe = cfg.moe.__class__(**{**cfg.moe.to_dict(), "num_experts": 4})
    train(cfg)
    return output


def _dense_file(tmp_path, num_classes=len(CLASSES)):
    torch.manual_seed(1)
    dense = create_model("gcvimoe_nano", num_classes=num_classes, in_chans=3, img_size=32, embed_dim=16,
                         num_experts=0)
    return dense, save_model(dense, tmp_path / "dense.safetensors")


def _val_loader(cfg):
    data_cfg = resolve_data_config("folder", cfg.data_dir, img_size=cfg.img_size, crop_pct=cfg.crop_pct,
                                   interpolation=cfg.interpolation)
    dataset = create_dataset(data_cfg, "val", build_transform(data_cfg, is_training=False))
    return create_loader(dataset, cfg.batch_size, is_training=False)


def test_initial_checkpoint_upcycles_dense_weights_that_start_at_the_dense_model(data_dir, tmp_path):
    dense, path = _dense_file(tmp_path)
    overrides = dict(NANO, data_dir=str(data_dir), epochs=1, output=str(tmp_path / "run"), initial_checkpoint=str(path),
                     weight_decay=0.0, tensorboard=False, moe={"num_experts": 8, "aux_loss_weight": 0.0})
    cfg = build_config(None, overrides)
    result = train(cfg)

    expected = evaluate(dense.eval(), _val_loader(cfg), len(CLASSES), DistInfo(device=torch.device("cpu")))
    assert result.initial_eval["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert result.initial_eval["top1"] == pytest.approx(expected["top1"], abs=1e-5)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "upcycled the dense weights" in log and "initial weights" in log

    # with no aux loss and no weight decay, a router moves only if the task loss reaches it through its gate
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg.model, {"num_classes": 3, "in_chans": 3, "img_size": 32, **cfg.model_args(),
                                    "moe": dict(cfg.model_args()["moe"], normalize_gates=True)})
    trained = read_checkpoint(tmp_path / "run" / "last.pth").state_dict
    routers = [f"{name}.router.weight" for name, _ in moe_layers(fresh)]
    assert routers and all(not torch.equal(trained[key], fresh.state_dict()[key]) for key in routers)


def test_convert_upcycle_defaults_preserve_the_dense_outputs(tmp_path, capsys):
    dense, path = _dense_file(tmp_path)
    output = tmp_path / "moe.safetensors"
    assert main(["convert", "upcycle", "--model", "gcvimoe_nano", "--checkpoint", str(path), "--output",
                 str(output)]) == 0
    printed = float(re.search(r"dropless eval\): ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    assert printed < 1e-5
    moe = read_checkpoint(output)
    model = build_model(moe.model_name, moe.model_args)
    model.load_state_dict(moe.state_dict)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (model.eval()(images) - dense.eval()(images)).abs().max() < 1e-5


def test_run_model_folder_loads_in_timm_and_reproduces_the_best_top1(run_dir, capsys):
    model = timm.create_model(f"local-dir:{run_dir / 'model'}", pretrained=True)
    config = timm.data.resolve_data_config({}, model=model)
    trained = read_checkpoint(run_dir / "best.pth").data_config
    assert config["mean"] == pytest.approx(trained["mean"]) and config["std"] == pytest.approx(trained["std"])
    assert config["crop_pct"] == trained["crop_pct"] and config["input_size"] == (3, 32, 32)
    assert model.pretrained_cfg["label_names"] == list(CLASSES)

    capsys.readouterr()
    assert main(["validate", "--checkpoint", str(run_dir / "model"), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = read_summary(run_dir / "summary.csv")
    best = max(rows, key=lambda row: float(row["eval_top1"]))  # the first best, as the trainer keeps it
    expected = max(float(best["eval_top1"]), float(best["ema_eval_top1"]))
    assert result["top1"] == pytest.approx(expected, abs=1e-4)


# timm validate.py's own steps (create_model, resolve_data_config, create_dataset with split search, create_loader,
# top-1), in a fresh interpreter whose only gcvimoe line is the import: neither timm's wheel nor its source
# distribution ships validate.py itself
TIMM_VALIDATE = """
import sys
import gcvimoe  # registers the gcvimoe_* models with timm
import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config

model_dir, data_dir = sys.argv[1:]
model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
config = resolve_data_config({}, model=model)
dataset = create_dataset("", root=data_dir, split="validation", input_img_mode="RGB")
loader = create_loader(dataset, batch_size=4, use_prefetcher=False, num_workers=0, **config)
hits = total = 0
with torch.inference_mode():
    for images, targets in loader:
        hits += int((model(images).argmax(1) == targets).sum())
        total += len(targets)
print(100.0 * hits / total)
"""


def test_timm_validate_steps_in_a_fresh_process_reproduce_gcvimoe_validate(run_dir, data_dir, capsys):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", TIMM_VALIDATE, str(run_dir / "model"), str(data_dir)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    capsys.readouterr()
    assert main(["validate", "--checkpoint", str(run_dir / "model"), "--data-dir", str(data_dir / "val"), "--json",
                 "--workers", "0"]) == 0
    assert float(done.stdout.split()[-1]) == pytest.approx(json.loads(capsys.readouterr().out)["top1"], abs=1e-6)


def test_best_is_weights_only_last_is_complete_and_keep_last_bounds_the_copies(run_dir):
    best = torch.load(run_dir / "best.pth", weights_only=True)
    last = torch.load(run_dir / "last.pth", weights_only=True)
    assert "optimizer" not in best and "ema_state_dict" in best and "optimizer" in last
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pth")) == ["checkpoint-2.pth"]
    assert f"output: {run_dir}" in (run_dir / "config.yaml").read_text()


def test_resume_from_best_says_it_holds_weights_only(run_dir, capsys):
    code, err = run_cli(capsys, "train", "--resume", str(run_dir / "best.pth"))
    assert_one_error_line(code, err, "weights only", "last.pth")


def test_a_second_run_into_the_same_folder_is_refused_and_changes_nothing(run_dir, data_dir, capsys):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, err = run_cli(capsys, "train", "--data-dir", str(data_dir), "--output", str(run_dir), "--epochs", "1")
    assert_one_error_line(code, err, "holds a previous run", "--resume", "--overwrite")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_predict_a_folder_with_a_corrupt_image_writes_the_good_ones(run_dir, data_dir, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(CLASSES):
        (images / ("sub" if i else "") / f"{name}.png").write_bytes((data_dir / "val" / name / "0.png").read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    results = tmp_path / "predictions.csv"
    code, err = run_cli(capsys, "predict", "--checkpoint", str(run_dir / "model"), str(images), "--topk", "2",
                        "--batch-size", "2", "--results-file", str(results))
    assert code == 0
    with open(results) as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["filename"].rsplit("/", 1)[1] for row in rows) == sorted(f"{name}.png" for name in CLASSES)
    assert all(row["label_0"] in CLASSES and 0 < float(row["prob_0"]) <= 1 for row in rows)
    assert "broken.png" in err and "skipped" in err
    code, err = run_cli(capsys, "predict", "--checkpoint", str(run_dir / "model"), str(images), "--topk", "0")
    assert_one_error_line(code, err, "--topk must be at least 1")


def test_validate_a_plain_state_dict_into_a_named_model_with_a_results_file(data_dir, tmp_path, capsys):
    torch.manual_seed(2)
    dense = create_model("gcvimoe_nano", num_classes=len(CLASSES), in_chans=3, num_experts=0).eval()
    plain, results = tmp_path / "plain.pth", tmp_path / "metrics.csv"
    torch.save({"model": dense.state_dict()}, plain)
    code, _ = run_cli(capsys, "validate", "--model", "gcvimoe_nano", "--checkpoint", str(plain), "--data-dir",
                      str(data_dir), "--results-file", str(results), "--workers", "0")
    assert code == 0
    with open(results) as f:
        (row,) = list(csv.DictReader(f))
    # the named model's own preprocessing (timm's pretrained_cfg) on the named data
    data_cfg = dataclasses.replace(resolve_data_config("folder", str(data_dir), img_size=32, in_chans=3, crop_pct=0.875),
                                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    loader = create_loader(create_dataset(data_cfg, "val", build_transform(data_cfg, is_training=False)), 4, False)
    expected = evaluate(dense, loader, len(CLASSES), DistInfo(device=torch.device("cpu")))
    assert float(row["top1"]) == pytest.approx(expected["top1"], abs=1e-4)
    assert float(row["loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    code, err = run_cli(capsys, "validate", "--checkpoint", str(plain), "--data-dir", str(data_dir))
    assert_one_error_line(code, err, "plain state dict", "--model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("argv", [
    ["train", "--epochs", "1"],
    ["validate", "--checkpoint", "CKPT"],
    ["predict", "--checkpoint", "CKPT", "IMAGE"],
    ["benchmark", "--model", "gcvimoe_nano", "--img-size", "32"],
    ["visualize", "--checkpoint", "CKPT", "--output", "viz"],
])
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_an_unavailable_or_unknown_device_is_one_line_exit_2(argv, device, run_dir, data_dir, capsys, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = str(data_dir / "val" / "circle" / "0.png")
    argv = [str(run_dir / "model") if a == "CKPT" else image if a == "IMAGE" else a for a in argv]
    code, err = run_cli(capsys, *argv, "--device", device)
    assert code == 2
    assert_one_error_line(code, err, device, "available here: auto, cpu")


def test_hub_names_load_from_the_local_cache_only(run_dir, tmp_path, monkeypatch):
    """hf-hub:NAME reads the Hugging Face cache layout (refs/main -> snapshots/<rev>/) and never downloads."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--digits-moe" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((run_dir / "model" / name).read_bytes())
    (cache / "models--someone--digits-moe" / "refs").mkdir()
    (cache / "models--someone--digits-moe" / "refs" / "main").write_text("0123abc")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import from the env
    hub = read_checkpoint("hf-hub:someone/digits-moe")
    local = read_checkpoint(f"local-dir:{run_dir / 'model'}")
    assert hub.model_name == local.model_name and hub.data_config == local.data_config
    assert all(torch.equal(hub.state_dict[k], local.state_dict[k]) for k in local.state_dict)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        read_checkpoint("hf-hub:someone/elsewhere")


def test_initial_weights_of_another_class_count_keep_all_but_a_fresh_head():
    from gcvimoe.models import load_initial_weights

    torch.manual_seed(0)
    source = create_model("gcvimoe_nano", num_classes=10, in_chans=3, num_experts=0)
    target = create_model("gcvimoe_nano", num_classes=3, in_chans=1, num_experts=0)
    fresh_head = target.head.fc.weight.detach().clone()
    notes = load_initial_weights(target, source_file := _save(source))
    assert any("the head is re-initialised" in note for note in notes) and str(source_file) in notes[0]
    assert any("stem is adapted from 3 to 1 input channels" in note for note in notes)
    assert torch.equal(target.head.fc.weight, fresh_head)
    assert torch.equal(target.stages[2].blocks[1].mlp.fc1.weight, source.stages[2].blocks[1].mlp.fc1.weight)
    # timm's adapt_input_conv sums the RGB filters into the one grey filter
    torch.testing.assert_close(target.stem.conv1.weight, source.stem.conv1.weight.sum(1, keepdim=True))


def _save(model):
    import tempfile
    return save_model(model, f"{tempfile.mkdtemp()}/source.safetensors")


def test_the_header_says_where_values_came_from_and_counts_cooldown(data_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: gcvimoe_nano\nmodel_kwargs: {embed_dim: 16}\ncooldown_epochs: 1\nbatch_size: 9\n"
                      "img_size: 32\nthreads: 1\n")
    output = tmp_path / "run"
    assert main(["train", "-c", str(recipe), "--data-dir", str(data_dir), "--epochs", "1", "--output", str(output),
                 "--no-tensorboard", "--workers", "0"]) == 0
    log = (output / "train.log").read_text()
    assert "epochs: 2 in total (1 of the schedule + 1 cooldown at min_lr)" in log
    assert "epochs 1 (from the command line)" in log and f"cooldown_epochs 1 (from config {recipe})" in log
    assert len(read_summary(output / "summary.csv")) == 2
    assert "in_chans 3 (from the data" in log  # RGB images, not grey


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(data_dir, tmp_path, capsys):
    """A kill during the first save leaves only the log and the config: --resume auto must start afresh there,
    while a folder that holds a finished run's records stays refused."""
    output = tmp_path / "run"
    output.mkdir()
    (output / "train.log").write_text("killed\n")
    (output / "config.yaml").write_text("epochs: 1\n")
    argv = ["train", "--data-dir", str(data_dir), "--model-kwargs", "{embed_dim: 16}", "--img-size", "32",
            "--epochs", "1", "--batch-size", "9", "--threads", "1", "--no-tensorboard", "--output", str(output),
            "--resume", "auto"]
    assert main(argv) == 0
    assert (output / "last.pth").is_file() and "killed" not in (output / "train.log").read_text()
    (output / "last.pth").unlink()  # a finished run's summary.csv stays behind: that is a run of value
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    code, err = run_cli(capsys, *argv)
    assert_one_error_line(code, err, "holds a previous run")
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


def test_predict_with_only_unreadable_files_fails_with_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    code, err = run_cli(capsys, "predict", "--checkpoint", str(run_dir / "model"), str(tmp_path / "broken.png"))
    assert_one_error_line(code, err, "no image could be read")
    assert "broken.png" in err  # named among the skipped


def test_visualize_into_an_existing_file_is_one_line(run_dir, tmp_path, capsys):
    taken = tmp_path / "viz"
    taken.write_text("a file")
    code, err = run_cli(capsys, "visualize", "--checkpoint", str(run_dir / "model"), "--output", str(taken))
    assert_one_error_line(code, err, "is a file", "give a folder")
    assert taken.read_text() == "a file"


def test_written_files_are_readable_by_others(run_dir):
    """Files are written through a temporary name; they end with the mode ``open()`` gives (0644 under umask 022),
    not a temporary file's 0600, so a shared model folder can be read by the people it is shared with."""
    import os
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [run_dir / "model" / "model.safetensors", run_dir / "last.pth", run_dir / "config.yaml"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_images_are_read_upright_by_their_exif_orientation(tmp_path):
    """A JPEG stored sideways with EXIF Orientation 6 (as phones write portraits) is read as every viewer shows it."""
    from PIL import Image

    from gcvimoe.data.images import read_image
    upright = Image.new("RGB", (20, 40), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 20, 10))  # a white band at the top
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 40 x 20, as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    read = read_image(tmp_path / "portrait.jpg", "RGB")
    assert read.size == (20, 40)
    pixels = torch.tensor(list(read.convert("L").getdata()), dtype=torch.float32).view(40, 20)
    assert pixels[:8].mean() > 200 and pixels[12:].mean() < 50


def test_benchmark_says_its_threads_and_warns_on_a_busy_machine(capsys, monkeypatch):
    import os
    previous = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        code, out, err = cli_json(capsys, "1")
        assert code == 0 and out["threads"] == 1 and "warning" not in err
        monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count() or 1) + 4, 0.0, 0.0))
        code, out, err = cli_json(capsys, "1")
        assert code == 0 and "warning: the machine's load" in err
        code, err = run_cli(capsys, "benchmark", "--model", "gcvimoe_pico", "--threads", "0")
        assert_one_error_line(code, err, "--threads must be at least 1")
    finally:
        torch.set_num_threads(previous)


def cli_json(capsys, threads):
    from helpers import cli
    code, out, err = cli(capsys, "benchmark", "--model", "gcvimoe_pico", "--img-size", "32", "--batch-size", "2",
                         "--steps", "1", "--threads", threads, "--json", "--device", "cpu")
    return code, json.loads(out.strip().splitlines()[-1]), err
