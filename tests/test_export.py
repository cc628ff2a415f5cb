"""torch.export and ONNX: one graph each, equal to the PyTorch model; MoE layers export dropless."""
import builtins
import json

import pytest
import torch

import gcvimoe
from gcvimoe.cli import main
from gcvimoe.models import save_model
from gcvimoe.moe import MoE


@pytest.mark.parametrize("router", ["linear", "cosine", "expert_choice"])
def test_moe_layer_exports_dropless_and_equals_eager(router):
    torch.manual_seed(0)
    top_k = 1 if router == "expert_choice" else 2
    layer = MoE(8, 16, num_experts=4, top_k=top_k, router=router, shared_expert=True).eval()
    x = torch.randn(3, 10, 8)
    program = torch.export.export(layer, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_experts", [8, 0], ids=["moe", "dense"])
def test_model_exports_with_a_dynamic_batch(num_experts):
    torch.manual_seed(0)
    model = gcvimoe.create_model("gcvimoe_nano", num_classes=10, num_experts=num_experts).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 1, 32, 32),), dynamic_shapes={"x": {0: batch}})
    for size in (1, 5):
        x = torch.randn(size, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", [
    ("gcvimoe_nano", dict(num_classes=10)),
    # the dense graph is the MoE graph's plainer half; it only costs time (make test-slow runs it)
    pytest.param("gcvimoe_xxtiny", dict(num_classes=10, num_experts=0, img_size=64), marks=pytest.mark.slow),
], ids=["nano-moe", "xxtiny-dense"])
def test_convert_onnx_reproduces_the_logits_in_onnxruntime(tmp_path, capsys, name, kwargs):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = gcvimoe.create_model(name, **kwargs).eval()
    save_model(model, tmp_path / "model.safetensors")
    assert main(["convert", "onnx", "--checkpoint", str(tmp_path / "model.safetensors"),
                 "--output", str(tmp_path / "model.onnx"), "--no-check"]) == 0
    assert "dropless" in capsys.readouterr().out or name.endswith("xxtiny")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for size in (1, 4):
        x = torch.randn(size, model.in_chans, *model.img_size)
        with torch.no_grad():
            expected = model(x).numpy()
        (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert abs(logits - expected).max() < 1e-4
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_convert_onnx_of_a_capacity_model_says_the_export_is_dropless(tmp_path, capsys, monkeypatch):
    model = gcvimoe.create_model("gcvimoe_nano", num_classes=10, eval_capacity_factor=1.25)
    save_model(model, tmp_path / "m.safetensors")
    monkeypatch.setattr("gcvimoe.cli.convert.export_onnx", lambda model, path, **kwargs: path)
    assert main(["convert", "onnx", "--checkpoint", str(tmp_path / "m.safetensors"), "--output",
                 str(tmp_path / "m.onnx"), "--no-check"]) == 0
    assert "the ONNX export is dropless" in capsys.readouterr().out


def test_missing_onnx_packages_are_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    save_model(gcvimoe.create_model("gcvimoe_nano", num_classes=10), tmp_path / "m.safetensors")
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxscript", "onnxruntime"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    assert main(["convert", "onnx", "--checkpoint", str(tmp_path / "m.safetensors"), "--output",
                 str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'gcvimoe[export]'" in err


def test_jit_trace_follows_new_routing():
    """A traced MoE model computes new inputs right: nothing routing-dependent is baked into the trace."""
    torch.manual_seed(0)
    model = gcvimoe.create_model("gcvimoe_nano", num_classes=10).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(4, 1, 32, 32),), check_trace=False)
        for scale in (1.0, 3.0, 0.3):
            x = torch.randn(4, 1, 32, 32) * scale
            torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


def test_convert_onnx_carries_labels_and_preprocessing_and_takes_opset_and_input_size(tmp_path, capsys):
    """The file travels alone: labels, mean/std and input size in its metadata; ``--input-size`` rebuilds the model
    for another size (the weights resized as for a fine-tune) and the graph reproduces that model."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from gcvimoe.models import read_checkpoint
    from gcvimoe.models.export import at_input_size
    torch.manual_seed(0)
    model = gcvimoe.create_model("gcvimoe_nano", num_classes=3).eval()
    data_config = {"class_names": ["ant", "bee", "cat"], "in_chans": 1, "img_size": 32, "mean": [0.25],
                   "std": [0.5], "crop_pct": 1.0, "interpolation": "bilinear"}
    save_model(model, tmp_path / "model", data_config)
    out = tmp_path / "model.onnx"
    assert main(["convert", "onnx", "--checkpoint", str(tmp_path / "model"), "--output", str(out), "--opset", "18",
                 "--input-size", "1", "64", "64", "--no-check"]) == 0
    assert "input 1x64x64, 3 labels" in capsys.readouterr().out
    proto = onnx.load(str(out))
    metadata = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert metadata["labels"] == ["ant", "bee", "cat"] and metadata["mean"] == [0.25] and metadata["std"] == [0.5]
    assert metadata["input_size"] == [1, 64, 64] and metadata["interpolation"] == "bilinear"
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    resized = at_input_size(model, 64, 64, read_checkpoint(tmp_path / "model"))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = resized(x).numpy()
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert abs(logits - expected).max() < 1e-4


@pytest.mark.parametrize("size, fragment", [(["3", "64", "64"], "the model takes 1 channels"),
                                            (["1", "50", "64"], "multiples of 32; pick e.g. 64 x 64")])
def test_a_bad_onnx_input_size_is_one_line(tmp_path, capsys, size, fragment):
    save_model(gcvimoe.create_model("gcvimoe_nano", num_classes=3), tmp_path / "m.safetensors")
    assert main(["convert", "onnx", "--checkpoint", str(tmp_path / "m.safetensors"), "--output",
                 str(tmp_path / "m.onnx"), "--input-size", *size]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and not (tmp_path / "m.onnx").exists()
