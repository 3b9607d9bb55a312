"""Real architectures, built offline from transformers configs and saved as Hugging Face
folders by the test: every technique works on them or says in one sentence why not, the
capability table says the same before anything runs, and every variant reloads from its
bundle."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch_pruning as tp

import engine
from engine.bundle import load_bundle, save_bundle
from engine.compress import COMPRESSORS, CompressContext
from engine.compress.capabilities import ROWS, capabilities
from engine.data import load_data
from engine.errors import UserError
from engine.export import onnx_bytes, ort_call
from engine.latency import round_robin
from engine.models import build_model
from engine.recipe import DataConfig, ModelConfig
from engine.runner import resolve
from engine.train import to_tensors, train

SHAPES = {"source": "builtin:shapes", "params": {"n_samples": 96}}
# transformers configs at test sizes, saved as folders (config.json + model.safetensors)
FOLDERS = {
    "resnet18": ("ResNetConfig", {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
                                  "depths": [2, 2, 2, 2], "layer_type": "basic"}),
    "mobilenet_v2": ("MobileNetV2Config", {"depth_multiplier": 0.35}),
    "efficientnet": ("EfficientNetConfig", {"width_coefficient": 0.25,
                                            "depth_coefficient": 0.25, "hidden_dim": 320}),
}
ARCHS = [*FOLDERS, "hfarch:convnext-tiny", "hfarch:vit-tiny"]
# the smallest settings that still exercise each technique
SETTINGS = {
    ("prune", "magnitude"): {"amount": 0.5, "finetune_epochs": 0},
    ("prune", "random"): {"amount": 0.5, "finetune_epochs": 0},
    ("prune", "obd"): {"amount": 0.5, "finetune_epochs": 0},
    ("prune", "obs"): {"amount": 0.5, "finetune_epochs": 0},
    ("prune", "structured"): {"amount": 0.5, "finetune_epochs": 0},
    ("lowrank", "svd"): {"finetune_epochs": 0}, ("lowrank", "nmf"): {"finetune_epochs": 0},
    ("share", None): {"bits": 4, "finetune_epochs": 0},
    ("quantize", "uniform"): {"bits": 4}, ("quantize", "log"): {"bits": 4},
    ("quantize", "qat"): {"bits": 4, "finetune_epochs": 0}, ("quantize", "fp16"): {},
    ("quantize", "dynamic_int8"): {}, ("quantize", "static_int8"): {"calibration_rows": 32},
    ("distill", None): {"epochs": 1},
    ("deep_compression", None): {"prune_epochs": 0, "share_epochs": 0},
}


def save_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> str:
    import transformers

    config_cls, settings = FOLDERS[name]
    config = getattr(transformers, config_cls)(num_labels=3, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(config)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per architecture: the model trained one epoch on the shapes, and its context."""
    data = load_data(DataConfig(**SHAPES), seed=0)
    dev = torch.device("cpu")
    tensors = to_tensors(data, dev)
    cfg = resolve({"train": {"epochs": 1, "batch_size": 32}}).train
    cache = {}

    def get(arch: str) -> tuple[torch.nn.Module, CompressContext]:
        if arch not in cache:
            source = save_folder(tmp_path_factory, arch) if arch in FOLDERS else arch
            model_cfg = ModelConfig(source=source)
            model = build_model(model_cfg, data.input_shape, 3, seed=0)
            train(model, data, cfg, device=dev, seed=0, tensors=tensors)
            ctx = CompressContext(tensors=tensors, task=data.task, input_shape=data.input_shape,
                                  n_out=3, train_cfg=cfg, model_cfg=model_cfg, data=data,
                                  device=dev, seed=0)
            cache[arch] = (model.eval(), ctx)
        return cache[arch]

    return get


def run_row(model, ctx, technique, method, **extra):
    entry = COMPRESSORS.get(technique)
    options = {**({"method": method} if method else {}), **SETTINGS[technique, method],
               **extra}
    return entry.fn(model, entry.resolve(options, "compress[0]"), ctx)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_technique_works_or_says_why_and_the_table_agrees(trained, arch, tmp_path):
    model, ctx = trained(arch)
    table = {(r["technique"], r["method"]): r for r in capabilities(model)}
    x = ctx.tensors["X_test"][:8]
    outcomes = {}
    for technique, method in ROWS:
        if technique in ("train", "export"):
            continue
        row = table[technique, method]
        try:
            result = run_row(model, ctx, technique, method)
        except UserError as exc:
            outcomes[technique, method] = f"refused: {exc}"
            assert row["status"] == "refused" and str(exc) == row["why"], (technique, method)
            continue
        outcomes[technique, method] = "works"
        assert row["status"].startswith("works"), (technique, method, row)
        if result.runtime == "onnxruntime":
            assert 0.0 <= result.metrics["test_accuracy"] <= 1.0
            if row["status"] != "works":  # a warning said before it ran is in its notes too
                assert row["why"] in result.notes
            continue
        folder = tmp_path / f"{technique}-{method}"  # its bundle gives the same model back
        save_bundle(result.model, folder, input_spec={}, output_spec={})
        with torch.no_grad():
            torch.testing.assert_close(load_bundle(folder)(x), result.model(x), rtol=0,
                                       atol=1e-5)
    assert sum(v == "works" for v in outcomes.values()) >= 13  # at most two refusals
    print(f"\n{arch}: " + json.dumps({f"{t} {m or ''}".strip(): v[:90]
                                     for (t, m), v in outcomes.items()}))


@pytest.mark.slow
def test_a_folder_loads_its_weights_and_replaces_a_head_of_another_size(tmp_path):
    import transformers

    config = transformers.ResNetConfig(num_labels=5, **FOLDERS["resnet18"][1])
    torch.manual_seed(0)
    hf = transformers.AutoModelForImageClassification.from_config(config).eval()
    hf.save_pretrained(tmp_path / "r")
    (tmp_path / "r" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]}))
    x = torch.rand(2, 3, 32, 32)
    same = build_model(ModelConfig(source=f"hf:{tmp_path / 'r'}"), (3, 32, 32), 5, seed=1)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():  # the folder's weights, and its own normalization inside
        expected = hf(pixel_values=(x - mean) / 0.2).logits
        torch.testing.assert_close(same.eval()(x), expected)
    assert same.workbench_notes == []
    other = build_model(ModelConfig(source=f"hf:{tmp_path / 'r'}"), (3, 32, 32), 3, seed=1)
    assert "head" in other.workbench_notes[0] and "5 classes" in other.workbench_notes[0]
    assert other.model.classifier[1].out_features == 3
    backbone = other.model.resnet.embedder.embedder.convolution.weight
    torch.testing.assert_close(backbone, hf.resnet.embedder.embedder.convolution.weight)
    result = engine.run({"data": SHAPES, "model": {"source": f"hf:{tmp_path / 'r'}"},
                         "train": {"epochs": 1, "freeze": ["model.resnet"]}})
    notes = result["variants"][0]["metrics"]["notes"]
    assert "5 classes and this data has 3" in notes[0]  # the run says the head is new


def test_bad_folders_are_one_sentence(tmp_path):
    import transformers

    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        build_model(ModelConfig(source=f"hf:{folder}"), (3, 32, 32), 3, seed=0)
    (folder / "config.json").write_text(json.dumps({"model_type": "resnet",
                                                    "auto_map": {"AutoModel": "x.Model"}}))
    with pytest.raises(UserError, match="needs remote code"):
        build_model(ModelConfig(source=f"hf:{folder}"), (3, 32, 32), 3, seed=0)
    # weights of another architecture: the first missing and unexpected keys, with shapes
    small = transformers.ResNetConfig(num_labels=3, embedding_size=8, hidden_sizes=[8, 16],
                                      depths=[1, 1], layer_type="basic")
    transformers.AutoModelForImageClassification.from_config(small).save_pretrained(folder)
    wide = json.loads((folder / "config.json").read_text())
    wide.update(embedding_size=16, hidden_sizes=[16, 32])
    (folder / "config.json").write_text(json.dumps(wide))
    with pytest.raises(UserError, match=r"convolution.weight is \[8, 3, 7, 7\] where the "
                                        r"architecture has \[16, 3, 7, 7\]"):
        build_model(ModelConfig(source=f"hf:{folder}"), (3, 32, 32), 3, seed=0)
    # grayscale data for a 3-channel folder, and an architecture name we do not have
    wide.update(embedding_size=8, hidden_sizes=[8, 16])
    (folder / "config.json").write_text(json.dumps(wide))
    with pytest.raises(UserError, match=r"3 channel.*data's have 1"):
        build_model(ModelConfig(source=f"hf:{folder}"), (1, 32, 32), 3, seed=0)
    with pytest.raises(UserError, match="unknown architecture 'resnet-9000'"):
        build_model(ModelConfig(source="hfarch:resnet-9000"), (3, 32, 32), 3, seed=0)


@pytest.mark.slow
def test_structured_pruning_of_a_resnet_equals_masking_and_is_smaller_and_faster(trained):
    """50% of the channels of every coupled group: the pruned ResNet computes what the
    original computes with those channels zeroed, and runs faster in ONNX Runtime."""
    model, ctx = trained("resnet18")
    pruned = run_row(model, ctx, "prune", "structured", correct="none").model
    masked = copy.deepcopy(model).eval()
    example = torch.zeros((2, *ctx.input_shape))
    pruner = tp.pruner.BasePruner(masked, example,
                                  importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5,
                                  ignored_layers=[masked.model.classifier[1]])
    with torch.no_grad():
        for group in pruner.step(interactive=True):  # zero each group instead of removing it
            for dep, idxs in group:
                layer = dep.target.module
                if dep.handler.__name__ == "prune_out_channels" and hasattr(layer, "weight"):
                    layer.weight[idxs] = 0
                    if getattr(layer, "bias", None) is not None:
                        layer.bias[idxs] = 0
    x = ctx.tensors["X_test"][:16]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-4, atol=1e-4)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    assert after < 0.35 * before
    files = {name: onnx_bytes(m, ctx.input_shape) for name, m in (("base", model),
                                                                  ("pruned", pruned))}
    assert len(files["pruned"]) < 0.4 * len(files["base"])
    figures = round_robin({n: ort_call(f, ctx.input_shape) for n, f in files.items()},
                          budget_s=1.0)
    assert figures["pruned"]["median_ms"] < figures["base"]["median_ms"]


def test_distilling_a_folder_model_keeps_its_family_at_a_width(trained):
    model, ctx = trained("resnet18")
    student = run_row(model, ctx, "distill", None).model
    assert type(student.model).__name__ == "ResNetForImageClassification"
    assert student.model.config.hidden_sizes == [8, 16, 32, 64]
    assert sum(p.numel() for p in student.parameters()) < 0.4 * sum(
        p.numel() for p in model.parameters())
    assert student.model.config.num_labels == ctx.n_out
