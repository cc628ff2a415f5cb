"""Files written by earlier releases keep loading and keep their outputs.

``fixtures/`` holds a training checkpoint (``last.pth`` of a one-epoch digits run of a 0.05 M-parameter GCViMoE
nano with 4 experts) and its safetensors export, both written by gcvimoe 0.1.0, and the logits that release computed
for a fixed input batch.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gcvimoe

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["nano_moe_checkpoint.pth", "nano_moe_export.safetensors"])
def test_old_files_load_and_give_the_same_logits(name):
    reference = load_file(FIXTURES / "nano_moe_logits.safetensors")
    model = gcvimoe.create_model_from_checkpoint(FIXTURES / name).eval()
    assert model.num_experts == 4
    with torch.no_grad():
        logits = model(reference["input"])
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-5)


def test_old_training_config_resumes_into_the_same_model():
    """The 0.1 checkpoint's flat MoE keys (null = model default) build the model it was trained as."""
    from gcvimoe.data.factory import resolve_data_config
    from gcvimoe.models import build_model, read_checkpoint
    from gcvimoe.train import build_config
    from gcvimoe.train.build import model_args

    checkpoint = read_checkpoint(FIXTURES / "nano_moe_checkpoint.pth")
    cfg = build_config(base=checkpoint.training["config"])
    assert cfg.moe.num_experts == 4 and cfg.epochs == 1
    data_cfg = resolve_data_config("digits", img_size=cfg.img_size)
    rebuilt = build_model(cfg.model, model_args(cfg, data_cfg))
    assert rebuilt.model_args == build_model(checkpoint.model_name, checkpoint.model_args).model_args
