"""Mistakes a user can make end as one ``error:`` line, a non-zero exit code and no traceback."""
import subprocess
import sys

import pytest
from PIL import Image

from gcvimoe.cli import main
from helpers import assert_one_error_line, run_cli


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """A run that got past the checks would write output/ into the working directory: keep it in tmp_path."""
    monkeypatch.chdir(tmp_path)


def make_folder(root, train=("a", "b"), val=("a",)):
    for split, classes in (("train", train), ("val", val)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / name / "0.png")
    return root


def test_missing_data_folder(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--data-dir", str(tmp_path / "nowhere"))
    assert_one_error_line(code, err, "nowhere does not exist", "--data-dir")


def test_folder_without_classes(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    code, err = run_cli(capsys, "train", "--data-dir", str(tmp_path))
    assert_one_error_line(code, err, "holds no class folders")


def test_val_classes_missing_from_train(tmp_path, capsys):
    make_folder(tmp_path, train=("a", "b"), val=("a", "zebra"))
    code, err = run_cli(capsys, "train", "--data-dir", str(tmp_path))
    assert_one_error_line(code, err, "classes not in the training classes: zebra")


def test_corrupt_image(tmp_path, capsys):
    make_folder(tmp_path, train=("a", "b"), val=("a",))
    (tmp_path / "train" / "b" / "0.png").write_bytes(b"\x89PNG broken")
    code, err = run_cli(capsys, "train", "--data-dir", str(tmp_path), "--output", str(tmp_path / "out"),
                        "--model-kwargs", "{embed_dim: 16}", "--batch-size", "2", "--img-size", "32", "--strict-data")
    assert_one_error_line(code, err, "cannot read image", "0.png", "replace or delete the file")
    # skipped by default, and one of two images is too many
    code, err = run_cli(capsys, "train", "--data-dir", str(tmp_path), "--output", str(tmp_path / "out2"),
                        "--model-kwargs", "{embed_dim: 16}", "--batch-size", "2", "--img-size", "32")
    assert_one_error_line(code, err, "1 of 2 train images (50.0 %) are unreadable, more than --max-bad-fraction 0.01")


def test_unknown_config_key_suggests_nearest(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("epoch: 3\n")
    code, err = run_cli(capsys, "train", "-c", str(tmp_path / "run.yaml"))
    assert_one_error_line(code, err, "unknown config key 'epoch'", "did you mean 'epochs'?")


def test_unknown_option_suggests_nearest(capsys):
    code, err = run_cli(capsys, "train", "--epocs", "3")
    assert_one_error_line(code, err, "unknown option --epocs", "did you mean --epochs?")


@pytest.mark.parametrize("where", ["file", "command line"])
def test_wrong_value_type(tmp_path, capsys, where):
    if where == "file":
        (tmp_path / "run.yaml").write_text("epochs: ten\n")
        code, err = run_cli(capsys, "train", "-c", str(tmp_path / "run.yaml"))
        assert_one_error_line(code, err, "'epochs' must be an integer, got 'ten'")
    else:
        code, err = run_cli(capsys, "train", "--epochs", "ten")
        assert_one_error_line(code, err, "--epochs must be an integer, got 'ten'")


def test_unknown_model_and_optimiser(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--model", "gcvimoe_nanoo", "--output", str(tmp_path / "m"))
    assert_one_error_line(code, err, "unknown model", "gcvimoe_nano")
    code, err = run_cli(capsys, "train", "--opt", "adamww", "--output", str(tmp_path / "o"),
                        "--model-kwargs", "{embed_dim: 16}")
    assert_one_error_line(code, err, "unknown optimiser 'adamww'", "adamw")


def test_validate_and_predict_bad_paths(tmp_path, capsys):
    code, err = run_cli(capsys, "validate", "--checkpoint", str(tmp_path / "none.pth"))
    assert_one_error_line(code, err, "none.pth not found")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    code, err = run_cli(capsys, "validate", "--checkpoint", str(tmp_path / "junk.pth"))
    assert_one_error_line(code, err, "cannot read checkpoint", "junk.pth")
    code, err = run_cli(capsys, "predict", "--checkpoint", str(tmp_path / "none.pth"), "x.png")
    assert_one_error_line(code, err, "not found")


def test_resume_errors(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--resume", str(tmp_path / "gone.pth"))
    assert_one_error_line(code, err, "resume checkpoint", "gone.pth not found")
    code, err = run_cli(capsys, "train", "--resume", "auto")
    assert_one_error_line(code, err, "--resume auto needs --output")


def test_real_process_prints_one_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gcvimoe", "train", "--data-dir", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: data folder {tmp_path / 'missing'} does not exist; "
                                                "pass --data-dir with a folder (expected DIR/train/<class>/<image> "
                                                "and DIR/val/<class>/<image>)"]


def test_deprecated_spellings_still_work_with_one_warning_line(capsys):
    """The 0.1 spellings `info MODEL` and `benchmark --amp bf16` keep working for one release, with a warning."""
    with pytest.warns(FutureWarning, match="gcvimoe info MODEL is deprecated; write gcvimoe info --model MODEL"):
        assert main(["info", "gcvimoe_nano", "--json"]) == 0
    assert '"model": "gcvimoe_nano"' in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "gcvimoe", "info", "gcvimoe_nano"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stderr.strip() == "warning: gcvimoe info MODEL is deprecated; write gcvimoe info --model MODEL"
    import argparse

    import torch

    from gcvimoe.cli.benchmark import _amp_dtype
    with pytest.warns(FutureWarning, match="--amp --amp-dtype bfloat16"):
        assert _amp_dtype(argparse.Namespace(amp="bf16", amp_dtype="float16")) is torch.bfloat16
    assert _amp_dtype(argparse.Namespace(amp="true", amp_dtype="float16")) is torch.float16
    assert _amp_dtype(argparse.Namespace(amp="false", amp_dtype="bfloat16")) is None


def test_compile_that_cannot_work_is_one_line(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    code, err = run_cli(capsys, "train", "--compile", "--epochs", "1", "--output", "run")
    assert_one_error_line(code, err, "--compile", "torch.compile is not supported", "train without --compile")
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: True)
    monkeypatch.setattr("gcvimoe.train.build.shutil.which", lambda name: None)
    code, err = run_cli(capsys, "train", "--compile", "--epochs", "1", "--output", "run2")
    assert_one_error_line(code, err, "needs a C++ compiler")
