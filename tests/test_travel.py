"""Folders that travel: a run trained on a relative --data-dir still finds its data from any other folder."""
import json

import pytest
import yaml

from gcvimoe.train.config import build_config
from gcvimoe.train.trainer import train
from helpers import cli, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
    """A 1-epoch run whose --data-dir was typed relative to the folder it was started in."""
    work = tmp_path_factory.mktemp("work")
    make_image_folder(work / "shapes", train_per_class=3, val_per_class=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        train(build_config(None, dict(model="gcvimoe_nano", model_kwargs={"embed_dim": 16}, img_size=32,
                                      batch_size=6, workers=0, threads=1, epochs=1, data_dir="shapes",
                                      output="run", tensorboard=False, moe={"num_experts": 2})))
    return work


def test_the_run_records_the_absolute_data_dir_and_the_path_as_typed(relative_run):
    absolute = str((relative_run / "shapes").resolve())
    assert yaml.safe_load((relative_run / "run" / "config.yaml").read_text())["data_dir"] == absolute
    recorded = json.loads((relative_run / "run" / "model" / "config.json").read_text())["gcvimoe"]["data_config"]
    assert (recorded["data_dir"], recorded["data_dir_as_typed"]) == (absolute, "shapes")


def test_visualize_finds_the_training_data_from_another_folder(relative_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "visualize", "--checkpoint", str(relative_run / "run" / "best.pth"), "--output",
                         "figures", "--per-class", "1", "--max-images", "3")
    assert code == 0, err
    assert (tmp_path / "figures" / "stats.json").is_file()
