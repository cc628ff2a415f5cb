"""What a run tells its user beyond the numbers: advice when capacity drops too many tokens, a resume that has nothing
left to train, and option combinations refused before the first step."""
import contextlib
import io
import shutil
from types import SimpleNamespace

import pytest
import yaml

from gcvimoe.cli import main
from gcvimoe.moe import MoEConfig
from gcvimoe.train import trainer
from helpers import assert_one_error_line, cli, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

# a half-width nano with 4 experts on 12 training images in batches of 2, no warmup
TINY = ["--model", "gcvimoe_nano", "--model-kwargs", "{embed_dim: 16}", "--num-experts", "4", "--img-size", "32",
        "--batch-size", "2", "--warmup-epochs", "0", "--workers", "0", "--threads", "1", "--no-tensorboard"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train_per_class=4, val_per_class=1, classes=("circle", "stripes"))


def _advice_lines(text):
    return [line for line in text.splitlines() if line.startswith("note:") and "dropped" in line]


@pytest.fixture(scope="module")
def dropping_run(data_dir, tmp_path_factory):
    """Two epochs at capacity 0.25 of 4 experts, which keeps at most a quarter of the assignments: the output folder
    and what was printed."""
    output = tmp_path_factory.mktemp("dropping") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", *TINY, "--capacity-factor", "0.25", "--epochs", "2", "--data-dir", str(data_dir),
                     "--output", str(output)])
    assert code == 0
    return output, stdout.getvalue()


def test_heavy_drops_after_warmup_get_one_line_of_advice(dropping_run):
    """Both epochs drop far above 10 %, and the advice comes once, naming the three remedies, in train.log too."""
    output, out = dropping_run
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ") and "| dropped " in line]
    assert len(epoch_lines) == 2
    assert all(float(line.split("| dropped ")[1].split("%")[0]) > 50 for line in epoch_lines), epoch_lines
    advice = _advice_lines(out)
    assert len(advice) == 1, out
    for remedy in ("--capacity-factor", "--capacity-factor 0", "--aux-loss-weight"):
        assert remedy in advice[0]
    assert advice == _advice_lines("\n".join(line.split(" ", 2)[2] for line in
                                             (output / "train.log").read_text().splitlines()))


@pytest.mark.parametrize("epoch, warmup, dropped, advised", [
    (1, 0, 0.25, True),     # after warmup, above the threshold
    (0, 1, 0.25, False),    # still warming up: the router has not settled yet
    (1, 1, 0.25, True),     # the first epoch after a one-epoch warmup
    (3, 0, 0.10, False),    # at the threshold, not above
    (3, None, 0.0, False),  # dropless
])
def test_advice_threshold_and_warmup(epoch, warmup, dropped, advised, caplog):
    run = SimpleNamespace(cfg=SimpleNamespace(warmup_epochs=warmup, moe=MoEConfig()), drops_advised=False)
    with caplog.at_level("INFO", logger="gcvimoe.train"):
        trainer._advise_on_drops(run, epoch, dropped)
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == (1 if advised else 0)
    assert run.drops_advised is advised


def test_resume_with_fewer_epochs_than_done_says_so_and_leaves_the_run(dropping_run, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(dropping_run[0], output)
    before = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()}
    code, out, err = cli(capsys, "train", "--epochs", "1", "--resume", "auto", "--output", str(output))
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert "already trained 2 epochs of the 1 requested" in lines[0] and "--epochs above 2" in lines[0]
    assert {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()} == before
    assert yaml.safe_load((output / "config.yaml").read_text())["epochs"] == 2


def test_resume_with_the_epochs_done_says_so_and_finishes_the_run_folder(dropping_run, tmp_path, capsys):
    """A kill after the last checkpoint but before the model folder: resuming completes the folder."""
    output = tmp_path / "run"
    shutil.copytree(dropping_run[0], output)
    shutil.rmtree(output / "model")
    code, out, err = cli(capsys, "train", "--resume", "auto", "--output", str(output))
    assert code == 0, err
    assert "all 2 epochs were already trained" in out
    assert (output / "model" / "model.safetensors").is_file()


def test_compile_with_channels_last_and_grad_checkpointing_is_refused_up_front(data_dir, tmp_path, capsys,
                                                                                monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the data was read before the refusal")
    monkeypatch.setattr("gcvimoe.train.build._build_data", never)
    code, _, err = cli(capsys, "train", *TINY, "--compile", "--channels-last", "--grad-checkpointing",
                       "--data-dir", str(data_dir), "--output", str(tmp_path / "run"))
    assert_one_error_line(code, err, "--compile", "--channels-last", "--grad-checkpointing")
    assert not (tmp_path / "run").exists()
