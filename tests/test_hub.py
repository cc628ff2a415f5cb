"""`gcvimoe convert hub`: a training run as a Hub folder whose model card carries the run's own numbers and whose
weights timm loads to the run's logits; nothing touches the network unless --push-to-hub asks."""
import pytest
import timm
import torch

from gcvimoe.analysis.card import best_epoch, read_run_records
from gcvimoe.models import create_model_from_checkpoint
from gcvimoe.models.info import describe_model
from gcvimoe.train.config import build_config
from gcvimoe.train.trainer import train
from helpers import assert_one_error_line, cli, make_image_folder, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-epoch MoE run of 4 experts, top-2, on a tiny folder."""
    data = make_image_folder(tmp_path_factory.mktemp("data"))
    output = tmp_path_factory.mktemp("run")
    cfg = build_config(None, dict(model="gcvimoe_nano", model_kwargs={"embed_dim": 16}, img_size=32, batch_size=6,
                                  workers=0, threads=1, warmup_epochs=0, lr=2e-3, scale=[0.8, 1.0], epochs=2,
                                  data_dir=str(data), output=str(output), tensorboard=False,
                                  moe={"num_experts": 4, "top_k": 2}))
    train(cfg)
    return output


def test_card_lists_the_runs_numbers_and_the_folder_loads_in_timm(run_dir, tmp_path, capsys):
    code, out, err = cli(capsys, "convert", "hub", str(run_dir), "--output", str(tmp_path / "hub"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "hub" / "README.md").read_text()

    history = read_run_records(run_dir)["history"]
    best, last = best_epoch(history), history[-1]
    for row, label in ((best, "best"), (last, "last")):
        assert (f"| {row['epoch']:.0f} ({label}) | {row['eval_top1']:.2f} | {row['eval_top5']:.2f} | "
                f"{row['eval_loss']:.4f} | {row['train_loss']:.4f} |") in card
    info = describe_model(create_model_from_checkpoint(run_dir / "best.pth"))
    assert info.num_experts == 4 and info.top_k == 2 and info.num_moe_layers == 4
    assert f"{info.total_params / 1e6:.2f} M total, {info.active_params / 1e6:.2f} M active" in card
    assert f"{info.macs / 1e9:.4f} G" in card
    assert "| experts per MoE layer | 4 |" in card and "| top-k | 2 |" in card
    assert "| labels | circle, square, stripes |" in card and "| epochs | `2` |" in card
    assert "library_name: timm" in card and "import gcvimoe" in card

    reference = create_model_from_checkpoint(run_dir / "best.pth").eval()
    shared = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), reference(x), rtol=0, atol=0)


def test_push_without_a_token_is_one_line_and_touches_no_network(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(capsys, "convert", "hub", str(run_dir), "--output", str(tmp_path / "hub"),
                        "--push-to-hub", "someone/model")
    assert_one_error_line(code, err, "someone/model", "token")
    assert (tmp_path / "hub" / "README.md").is_file()  # the folder is written before the push


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    code, err = run_cli(capsys, "convert", "hub", str(tmp_path), "--output", str(tmp_path / "hub"))
    assert_one_error_line(code, err, "summary.csv", "--output folder")


def test_info_checkpoint_describes_the_file_as_the_model_name_would(run_dir, capsys):
    import json

    from gcvimoe.models.info import model_info

    code, out, err = cli(capsys, "info", "--checkpoint", str(run_dir / "best.pth"), "--json")
    assert code == 0, err
    expected = model_info("gcvimoe_nano", embed_dim=16, num_classes=3, in_chans=3, img_size=32, num_experts=4,
                          top_k=2)
    assert {k: v for k, v in json.loads(out).items()} == {**expected.__dict__, "input_size": [3, 32, 32]}
