"""Bad inputs and faults: unreadable images are skipped, counted and listed; 16-bit images keep their values; a full or
read-only disk never costs the previous checkpoint; small mistakes are one line and exit 2."""
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli as run_cli
from gcvimoe.data import DataConfig, build_transform, load_image
from gcvimoe.data.images import read_image
from gcvimoe.errors import GcvimoeError
from gcvimoe.files import atomic_path, temporary_path
from gcvimoe.train.checkpointing import save_checkpoint

# gcvimoe silences PIL's warning about images it refuses anyway; pytest resets warning filters for each test
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]

CHECKPOINT = os.path.join(os.path.dirname(__file__), "fixtures", "nano_moe_checkpoint.pth")
# a quarter-width nano with 2 experts: one epoch of 16 images in a few seconds
TINY = ["--model", "gcvimoe_nano", "--model-kwargs", "{embed_dim: 16}", "--num-experts", "2", "--img-size", "32",
        "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0", "--threads", "1", "--tensorboard", "false"]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width x height`` grey pixels (a decompression bomb's shape)."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(bytes(4096))) + _chunk(b"IEND", b"")


def bad_files():
    """One file of each kind an image folder can hold by mistake, with the reason gcvimoe gives for it."""
    rng = np.random.default_rng(1)
    good_png = _png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    damaged = bytearray(good_png)
    damaged[60:100] = bytes(40)  # inside the compressed pixel data
    return {
        "empty.png": (b"", "empty file"),
        "notes.jpg": (b"not an image at all\n", "not an image"),
        "noise.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not an image"),
        "half.png": (good_png[: len(good_png) // 2], "truncated"),
        "half.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated"),
        "damaged.png": (bytes(damaged), "corrupt"),
        "bomb.png": (_png_declaring(14000, 13000), "more than 89 megapixels"),
        "huge.png": (_png_declaring(10000, 10000), "more than 89 megapixels"),
    }


def make_folder(root, per_class=8, val_per_class=2):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label, name in enumerate(("dark", "light")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 100, (16, 16, 3)) + 150 * label
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def salted_folder(root):
    """8 good images per class, and each kind of bad file in train/ (alternating classes) plus one in val/."""
    make_folder(root)
    salted = {}
    for i, (name, (data, reason)) in enumerate(bad_files().items()):
        path = root / "train" / ("dark", "light")[i % 2] / name
        path.write_bytes(data)
        salted[str(path)] = reason
    val_bad = root / "val" / "dark" / "zero.png"
    val_bad.write_bytes(b"")
    salted[str(val_bad)] = "empty file"
    return salted


def read_bad_files(output):
    lines = (output / "bad_files.txt").read_text().splitlines()
    return dict(line.split("\t") for line in lines)


def assert_one_line(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_every_kind_of_bad_file_has_its_reason(tmp_path):
    for name, (data, reason) in bad_files().items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(GcvimoeError, match=f"cannot read image .*{name} \\({reason}"):
            load_image(tmp_path / name, "RGB")


@pytest.mark.parametrize("workers,check", [(0, False), (2, False), (0, True)])
def test_bad_files_are_skipped_counted_and_listed(tmp_path, capsys, workers, check):
    salted = salted_folder(tmp_path / "data")
    output = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", *TINY, "--data-dir", str(tmp_path / "data"), "--output", str(output),
                             "--max-bad-fraction", "0.5", "--workers", str(workers),
                             *(["--check-data"] if check else []))
    assert code == 0, err
    assert read_bad_files(output) == salted
    epoch_line = next(line for line in out.splitlines() if line.startswith("epoch   1/1"))
    assert f"{len(salted)} unreadable images skipped" in epoch_line
    if check:  # listed before the first step
        log = out[:out.index("epoch   1/1")]
        assert "check-data: unreadable images: 8 of 24 train, 1 of 5 val" in log
        assert all(path in log for path in salted)


def test_too_many_bad_files_stop_the_run_with_one_line(tmp_path, capsys):
    salted = salted_folder(tmp_path / "data")
    code, _, err = run_cli(capsys, "train", *TINY, "--data-dir", str(tmp_path / "data"), "--output",
                           str(tmp_path / "run"))
    assert_one_line(code, err, "unreadable, more than --max-bad-fraction 0.01", "raise --max-bad-fraction")
    listed = read_bad_files(tmp_path / "run")
    assert listed and set(listed) <= set(salted)  # what was found before the stop


def test_strict_data_stops_at_the_first_bad_file(tmp_path, capsys):
    salted = salted_folder(tmp_path / "data")
    code, _, err = run_cli(capsys, "train", *TINY, "--data-dir", str(tmp_path / "data"), "--output",
                           str(tmp_path / "run"), "--strict-data")
    assert_one_line(code, err, "cannot read image", "replace or delete the file")
    assert any(path in err for path in salted)


def test_substitution_is_the_next_readable_image(tmp_path):
    from gcvimoe.data.folder import ImageFolder
    make_folder(tmp_path, per_class=3)
    (tmp_path / "train" / "dark" / "1.png").write_bytes(b"")
    folder = ImageFolder(tmp_path, "train", skip_unreadable=True, transform=np.asarray)
    assert [p.rsplit("/", 2)[-2:] for p, _ in folder.samples][:3] == [["dark", "0.png"], ["dark", "1.png"],
                                                                      ["dark", "2.png"]]
    image, label = folder[1]  # dark/1.png is empty: dark/2.png comes instead, with its own label
    np.testing.assert_array_equal(image, np.asarray(Image.open(tmp_path / "train" / "dark" / "2.png")))
    assert label == 0 and folder.unreadable_files() == [(1, 1)]
    assert folder[1][0].tobytes() == image.tobytes()  # the same when already known


def test_16bit_png_equals_its_8bit_version(tmp_path):
    """A 16-bit image is scaled into the 8-bit range (v / 257), not clipped; a float image is read as [0, 1]."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "16.png")
    # any 16-bit value that rounds to the same 8-bit level: up to half a level away
    jitter = rng.integers(-128, 129, grey.shape)
    Image.fromarray((grey.astype(np.int64) * 257 + jitter).clip(0, 65535).astype(np.uint16)).save(tmp_path / "16j.png")
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "f.tiff")
    assert Image.open(tmp_path / "16.png").mode == "I;16"
    data_cfg = DataConfig("folder", "", 24, 3, (0.5,) * 3, (0.25,) * 3, "bicubic", 1.0, ["a"])
    transform = build_transform(data_cfg)
    reference = transform(load_image(tmp_path / "8.png", "RGB"))
    for name in ("16.png", "16j.png", "f.tiff"):
        torch.testing.assert_close(transform(load_image(tmp_path / name, "RGB")), reference, rtol=0, atol=1e-6)
    # hand-computed levels, and the old clipping would have made every pixel above 255 white
    Image.fromarray(np.array([[0, 257, 32767, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "levels.png")
    assert np.asarray(read_image(tmp_path / "levels.png", "L")).tolist() == [[0, 1, 127, 128, 255]]
    Image.fromarray(np.array([[-0.5, 0.0, 0.5, 1.0, 7.0]], dtype=np.float32)).save(tmp_path / "levels.tiff")
    assert np.asarray(read_image(tmp_path / "levels.tiff", "L")).tolist() == [[0, 0, 128, 255, 255]]


# --- disk


def _failing_save(reason):
    """A torch.save that writes part of the file, then fails the way torch reports a full disk."""
    def save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial" * 1000)
        raise RuntimeError(reason)
    return save


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import gcvimoe.files
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(torch, "save", _failing_save("[enforce fail at inline_container.cc:672] . unexpected pos"))
    monkeypatch.setattr(gcvimoe.files, "_free_bytes", lambda folder: 4096)  # as a full disk leaves it
    with pytest.raises(GcvimoeError, match="no space left to write .*last.pth; free disk space"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    # with room on the disk the same failure is a bug and keeps its own message
    monkeypatch.setattr(torch, "save", _failing_save("something else"))
    with pytest.raises(RuntimeError, match="something else"):
        save_checkpoint({"epoch": 2}, path)
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]


@pytest.mark.parametrize("failure", ["body", "replace", "interrupt", "folder"])
def test_atomic_path_cleans_up_on_every_failure(tmp_path, monkeypatch, failure):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    error = {"body": ValueError, "replace": GcvimoeError, "interrupt": KeyboardInterrupt, "folder": ValueError}
    if failure == "replace":
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.raises(error[failure]):
        with atomic_path(path) as tmp:
            if failure == "folder":
                tmp.mkdir()
                (tmp / "part").write_bytes(b"x")
            else:
                tmp.write_bytes(b"new, half written")
            if failure != "replace":
                raise error[failure]()
    assert sorted(os.listdir(tmp_path)) == ["out.bin"] and path.read_bytes() == b"old"


def test_atomic_path_removes_a_leftover_and_names_a_file_in_the_way(tmp_path):
    temporary_path(tmp_path / "a.txt").mkdir()  # a killed folder write
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("ok")
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]
    with pytest.raises(GcvimoeError, match="a.txt is a file, not a folder"):
        with atomic_path(tmp_path / "a.txt" / "b.txt") as tmp:
            tmp.write_text("never")


def test_read_only_writer_errors_are_one_line(tmp_path, monkeypatch):
    """safetensors wraps the OS error in its own type: the folder says why."""
    import gcvimoe.files
    monkeypatch.setattr(gcvimoe.files.os, "access", lambda *a: False)
    with pytest.raises(GcvimoeError, match=r"cannot write .*x.safetensors \(.*\); choose a writable --output"):
        with atomic_path(tmp_path / "x.safetensors"):
            raise Exception("Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem })")


def test_output_naming_a_file_and_a_full_output_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "taken").write_text("")
    code, _, err = run_cli(capsys, "train", *TINY, "--output", "taken/run")
    assert_one_line(code, err, "taken is a file, not a folder")
    import gcvimoe.train.checks
    monkeypatch.setattr(gcvimoe.train.checks.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1024))
    code, _, err = run_cli(capsys, "train", *TINY, "--output", "run")
    assert_one_line(code, err, "the output folder run has 0 MiB free, the run needs about", "free disk space")
    assert not (tmp_path / "run" / "last.pth").exists()


FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    from gcvimoe.cli import main
    from gcvimoe.errors import GcvimoeError
    from gcvimoe.models import read_checkpoint
    from gcvimoe.train import Callback, build_config, train

    root = Path(sys.argv[1])
    disk, read_only = root / "disk", root / "ro"
    for folder, options in ((disk, "size=32m"), (read_only, "ro,size=1m")):
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)

    class FillTheDisk(Callback):
        def on_epoch_end(self, run, state, eval_result):
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(bytes(1 << 16))
                        f.flush()
                except OSError:
                    pass

    cfg = build_config(None, dict(model="gcvimoe_nano", model_kwargs={"embed_dim": 16}, num_experts=2, img_size=32,
                                  batch_size=64, epochs=2, warmup_epochs=0, threads=1, tensorboard=False,
                                  output=str(disk / "run")))  # checkpoints of about 11 MB
    result = {}
    try:
        train(cfg, callbacks=[FillTheDisk()])
    except GcvimoeError as e:
        result["error"] = str(e)
    result["files"] = sorted(os.listdir(disk / "run"))
    result["epoch"] = read_checkpoint(disk / "run" / "last.pth").training["epoch"]
    result["export"] = main(["convert", "export", "--checkpoint", sys.argv[2], "--output", str(read_only / "m")])
    result["train_ro"] = main(["train", "--epochs", "1", "--output", str(read_only / "run")])
    print(json.dumps(result))
""")


def test_full_tmpfs_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk (a small tmpfs in a private mount namespace; skipped where mounting is not allowed)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
            capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    done = subprocess.run(["unshare", "-m", sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path), CHECKPOINT],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # best.pth is written before last.pth (see the trainer), so either may be the write that finds the disk full
    assert result["error"].startswith("no space left to write ") and ".pth" in result["error"]
    assert result["epoch"] == 1  # epoch 2's save failed: epoch 1's checkpoint is intact
    assert not [name for name in result["files"] if name.endswith(".tmp")], result["files"]
    assert result["export"] == 2 and result["train_ro"] == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("Read-only file system" in line for line in errors), done.stderr
    assert "Traceback" not in done.stderr


# --- small mistakes: one line, exit 2


@pytest.mark.parametrize("argv,fragments", [
    (["train", "--lr", "nan"], ["config key 'lr' must be a finite number, got nan"]),
    (["train", "--scale", "0.5,inf"], ["config key 'scale' must be a finite number, got inf"]),
    (["train", "--max-bad-fraction", "1.5"], ["'max_bad_fraction' must be in [0, 1]"]),
    (["validate", "--checkpoint", CHECKPOINT, "--batch-size", "-5"], ["--batch-size must be at least 1, got -5"]),
    (["validate", "--checkpoint", CHECKPOINT, "--workers", "-1"], ["--workers must not be negative"]),
    (["info", "--model", "gcvimoe_nano", "--img-size", "0"], ["--img-size must be at least 1, got 0"]),
    (["demo", "--epochs", "0"], ["--epochs must be at least 1, got 0"]),
])
def test_small_mistakes_are_one_line(capsys, argv, fragments):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line(code, err, *fragments)


def test_top_k_above_num_experts_reads_the_same_in_info_and_train(capsys):
    code, _, info_err = run_cli(capsys, "info", "--model", "gcvimoe_nano", "--num-experts", "3", "--top-k", "5")
    assert_one_line(code, info_err, "top_k", "num_experts=3", "got 5")
    code, _, train_err = run_cli(capsys, "train", "--num-experts", "3", "--top-k", "5", "--output", "run")
    assert_one_line(code, train_err)
    assert train_err == info_err


def test_data_dir_naming_a_file(tmp_path, capsys):
    (tmp_path / "images.tar").write_bytes(b"")
    code, _, err = run_cli(capsys, "train", "--data-dir", "images.tar")
    assert_one_line(code, err, "--data-dir images.tar is a file, not a folder")
    assert "does not exist" not in err
    code, _, err = run_cli(capsys, "validate", "--checkpoint", CHECKPOINT, "--data-dir", "images.tar")
    assert_one_line(code, err, "is a file, not a folder")


def test_a_checkpoint_holding_code_never_suggests_loading_it_unsafely(tmp_path, capsys):
    torch.save({"state_dict": {}, "trap": DataConfig}, tmp_path / "trap.pth")  # a pickled class
    (tmp_path / "junk.pth").write_bytes(b"junk, not a pickle")
    for name, reason in (("trap.pth", "objects other than tensors and plain data"),
                         ("junk.pth", "not a PyTorch checkpoint")):
        code, _, err = run_cli(capsys, "validate", "--checkpoint", str(tmp_path / name))
        assert_one_line(code, err, "cannot read checkpoint", reason)
        assert "weights_only" not in err and "trust" not in err
