"""Built-in architectures, uploads (never unpickled), complexity figures, shape checks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import engine
from engine.bundle import load_bundle
from engine.errors import UserError
from engine.models import (
    MODELS,
    build_model,
    complexity,
    describe,
    layer_names,
    onnx_complexity,
    save_model,
)
from engine.recipe import ModelConfig


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [(1, 8, 8), (30,), (3, 20)])
def test_builtins_fit_images_tables_and_signals(name, shape):
    model = build_model(ModelConfig(source=f"builtin:{name}"), shape, 5, seed=0)
    assert model(torch.zeros(4, *shape)).shape == (4, 5)


def test_cnn_uses_2d_convolutions_for_images_and_1d_for_rows():
    image = build_model(ModelConfig(source="builtin:cnn"), (1, 8, 8), 10, seed=0)
    row = build_model(ModelConfig(source="builtin:cnn"), (30,), 2, seed=0)
    assert isinstance(image.conv1, torch.nn.Conv2d)
    assert isinstance(row.conv1, torch.nn.Conv1d)


def test_complexity_counts_parameters_flops_and_size():
    cfg = ModelConfig(source="builtin:mlp", hidden=(16,))
    model = build_model(cfg, (1, 8, 8), 10, seed=0)
    with torch.no_grad():
        model.fc1.weight[:, :10] = 0
    c = complexity(model, (1, 8, 8))
    assert c["params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert c["nonzero_params"] == c["params"] - 160
    assert c["trainable_params"] == c["params"]
    assert c["flops"] == 2 * (64 * 16 + 16 * 10)  # a multiply-add counts two
    assert c["size_bytes"] > 4 * c["params"]  # the serialized file, not a parameter count


def test_pt2_round_trip_and_fine_tune(tmp_path):
    cfg = ModelConfig(source="builtin:mlp", hidden=(8,))
    model = build_model(cfg, (4,), 3, seed=0)
    size = save_model(model, (4,), tmp_path / "m.pt2")
    assert size == (tmp_path / "m.pt2").stat().st_size
    loaded = build_model(ModelConfig(source=str(tmp_path / "m.pt2")), (4,), 3, seed=0)
    x = torch.randn(7, 4)  # a batch size other than the one exported: dynamic batch axis
    assert torch.allclose(loaded(x), model(x))
    result = engine.run({"data": {"source": "builtin:iris"},
                         "model": {"source": str(tmp_path / "m.pt2")},
                         "train": {"epochs": 30, "lr": 0.01, "freeze": ["fc1"]}})
    assert result["variants"][0]["metrics"]["test_accuracy"] > 0.6
    assert result["variants"][0]["metrics"]["trainable_params"] == 8 * 3 + 3


class SamePadConv(torch.nn.Conv2d):
    """TensorFlow's "same" padding as EfficientNet ports write it: a padding child, then
    the convolution."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)
        total = max(k - stride, 0)  # for an even input size
        self.static_padding = torch.nn.ZeroPad2d((total // 2, total - total // 2,
                                                  total // 2, total - total // 2))

    def forward(self, x):
        return self._conv_forward(self.static_padding(x), self.weight, self.bias)


def test_a_pt2_convolution_that_pads_through_a_child_is_a_real_conv(tmp_path):
    """EfficientNet-Lite's convolutions pad through a child module: each becomes a real
    Conv2d (the padding folded in when symmetric, else a ZeroPad2d before it), so
    pruning and every other technique see them, and the outputs stay the same."""
    from engine.compress import prunable
    from engine.models import set_training

    torch.manual_seed(0)
    net = torch.nn.Sequential(SamePadConv(3, 8, 3, stride=2), torch.nn.ReLU(),
                              SamePadConv(8, 8, 3, groups=8), SamePadConv(8, 4, 1),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    save_model(net, (3, 16, 16), tmp_path / "same.pt2")
    loaded = build_model(ModelConfig(source=str(tmp_path / "same.pt2")), (3, 16, 16), 4, seed=0)
    set_training(loaded, False)
    x = torch.randn(5, 3, 16, 16)
    assert torch.allclose(loaded(x), net(x), atol=1e-6)
    names = [name for name, _ in prunable(loaded)]
    assert names == ["0.conv", "2", "3"]  # stride 2 pads (0, 1, 0, 1): kept as a ZeroPad2d
    assert isinstance(loaded.get_submodule("0.pad"), torch.nn.ZeroPad2d)
    assert loaded.get_submodule("2").padding == (1, 1)  # symmetric: the conv's own


def test_state_dict_upload_needs_its_architecture(tmp_path):
    model = build_model(ModelConfig(source="builtin:mlp", hidden=(8,)), (4,), 3, seed=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    cfg = ModelConfig(source=str(tmp_path / "w.pt"), architecture="mlp", hidden=(8,))
    loaded = build_model(cfg, (4,), 3, seed=0)
    assert torch.equal(loaded.fc1.weight, model.fc1.weight)
    with pytest.raises(UserError, match=r"model\.architecture"):
        build_model(ModelConfig(source=str(tmp_path / "w.pt")), (4,), 3, seed=0)
    with pytest.raises(UserError, match=r"\(16, 4\)|\(8, 4\)"):
        build_model(ModelConfig(source=str(tmp_path / "w.pt"), architecture="mlp",
                                hidden=(16,)), (4,), 3, seed=0)


class Payload:
    def __reduce__(self):  # would run a command if it were ever unpickled
        return (print, ("pickle executed",))


def test_a_pickle_disguised_as_pt_is_refused_without_running(tmp_path, capsys):
    for name, writer in (("evil.pt", lambda f: pickle.dump(Payload(), f)),
                         ("evil2.pt", lambda f: torch.save({"x": Payload()}, f))):
        with open(tmp_path / name, "wb") as f:
            writer(f)
        with pytest.raises(UserError, match="never loaded"):
            build_model(ModelConfig(source=str(tmp_path / name), architecture="mlp"), (4,), 3,
                        seed=0)
    assert "pickle executed" not in capsys.readouterr().out


def test_torchscript_upload(tmp_path):
    model = build_model(ModelConfig(source="builtin:mlp", hidden=(8,)), (4,), 3, seed=0)
    torch.jit.save(torch.jit.script(model), tmp_path / "s.pt")
    loaded = build_model(ModelConfig(source=str(tmp_path / "s.pt")), (4,), 3, seed=0)
    x = torch.randn(5, 4)
    assert torch.allclose(loaded(x), model(x))
    result = engine.run({"data": {"source": "builtin:iris"},
                         "model": {"source": str(tmp_path / "s.pt")}, "train": {"epochs": 2}},
                        out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "baseline" / "model.pt2").is_file()
    assert result["variants"][0]["metrics"]["params"] == 4 * 8 + 8 + 8 * 3 + 3
    # its bundle keeps the converted graph as the architecture, and gives the same outputs
    reloaded = load_bundle(tmp_path / "out" / "baseline")
    assert (tmp_path / "out" / "baseline" / "graph.pt2").is_file()
    trained = build_model(ModelConfig(source=str(tmp_path / "out" / "baseline")), (4,), 3,
                          seed=0)
    assert torch.equal(reloaded(x), trained(x)) and not torch.equal(reloaded(x), model(x))


def test_a_model_that_does_not_fit_the_data_names_both_shapes(tmp_path):
    model = build_model(ModelConfig(source="builtin:mlp", hidden=(8,)), (4,), 3, seed=0)
    save_model(model, (4,), tmp_path / "m.pt2")
    with pytest.raises(UserError, match=r"\(13,\)"):  # wine has 13 features
        engine.run({"data": {"source": "builtin:wine"},
                    "model": {"source": str(tmp_path / "m.pt2")}})
    with pytest.raises(UserError, match=r"outputs of shape \(3,\).*\(2,\)"):
        build_model(ModelConfig(source=str(tmp_path / "m.pt2")), (4,), 2, seed=0)


def test_onnx_files_get_complexity_but_are_not_trained(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
                              [w])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    info = onnx_complexity(tmp_path / "m.onnx")
    assert info["params"] == 12 and info["operators"] == {"MatMul": 1}
    with pytest.raises(UserError, match="ONNX"):
        build_model(ModelConfig(source=str(tmp_path / "m.onnx")), (4,), 3, seed=0)


def test_layer_names_are_what_freeze_takes():
    model = build_model(ModelConfig(source="builtin:cnn"), (1, 8, 8), 10, seed=0)
    assert layer_names(model) == ["conv1", "conv2", "fc1", "fc2", "out"]


def test_describe_gives_figures_and_layers_for_the_model_page():
    info = describe(ModelConfig(source="builtin:cnn"), (1, 8, 8), 10)
    assert [r["layer"] for r in info["layers"]][:3] == ["conv1", "cact1", "pool1"]
    assert info["layers"][0]["output"] == "16x8x8"
    assert sum(r["params"] for r in info["layers"]) == info["params"]


@pytest.mark.slow
def test_an_old_ir_onnx_graph_with_weights_computed_in_the_graph_runs(tmp_path):
    """Model-zoo files from before ONNX IR 4 list every initializer as a graph input and
    compute weights with nodes; the checker used to end the run in a traceback."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.random((4, 3), dtype=np.float32), "W"),
             numpy_helper.from_array(np.zeros(3, np.float32), "B"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
              *(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims))
                for t in inits)]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["W", "two"], ["W2"]),
         helper.make_node("Gemm", ["x", "W2", "B"], ["y"])], "zoo", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.save(model, tmp_path / "zoo.onnx")
    recipe = {"data": {"source": "builtin:iris"}, "model": {"source": str(tmp_path / "zoo.onnx")}}
    result = engine.run(recipe, out_dir=tmp_path / "run")
    assert [v["name"] for v in result["variants"]] == ["baseline", "quantize-dynamic_int8"]
    assert all(v["metrics"]["test_accuracy"] >= 0 for v in result["variants"])
    # Deploy puts the data's preprocessing in front: its opset 9 is converted, its listed
    # weights are not inputs, and its own input and output names are kept inside
    from engine import deploy

    for v in result["variants"]:
        file, info = deploy.export_stored(recipe, str(tmp_path / "run" / v["model_file"]),
                                          name=v["name"])
        proto = onnx.load_from_string(file)
        assert [i.name for i in proto.graph.input] == ["input"]
        assert info["onnx"]["accuracy"] == pytest.approx(v["metrics"]["test_accuracy"])
