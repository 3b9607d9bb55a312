"""The GPU path's options (precision, compile), exercised on the CPU, and their record."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.data import load_data
from engine.errors import UserError
from engine.models import build_model
from engine.recipe import Recipe
from engine.runner import resolve
from engine.train import train, uses_bf16

CPU = torch.device("cpu")


def _recipe(**train) -> Recipe:
    return resolve({"data": {"source": "builtin:iris"},
                             "model": {"source": "builtin:mlp", "hidden": [8]},
                             "train": {"epochs": 3, "early_stopping": None, "batch_size": 32,
                                       **train}})


def _fit(recipe: Recipe):
    data = load_data(recipe.data, seed=0)
    model = build_model(recipe.model, data.input_shape, data.n_classes, seed=0)
    return train(model, data, recipe.train, device=CPU, seed=0)


def test_old_recipes_stay_valid_and_round_trip() -> None:
    recipe = resolve({"train": {"amp": False}})
    assert recipe.train.precision == "auto" and recipe.train.compile is False
    again = resolve(recipe.to_dict())
    assert again == recipe and again.to_dict()["train"]["precision"] == "auto"


def test_precision_choices() -> None:
    cuda = torch.device("cuda")
    assert uses_bf16(_recipe().train, cuda) and not uses_bf16(_recipe().train, CPU)
    assert not uses_bf16(_recipe(amp=False).train, cuda)
    assert not uses_bf16(_recipe(precision="fp32").train, cuda)
    assert uses_bf16(_recipe(precision="bf16").train, CPU)
    with pytest.raises(UserError, match=r"train\.precision must be one of"):
        _recipe(precision="fp16")
    with pytest.raises(UserError, match="bf16 does not work with lbfgs"):
        _recipe(precision="bf16", optimizer="lbfgs")


def test_default_cpu_path_is_fp32_eager() -> None:
    fit = _fit(_recipe())
    assert fit.path == {"device": "cpu", "precision": "fp32", "compiled": False,
                        "ensemble": "single"}


def test_bf16_autocast_runs_on_the_cpu_and_is_recorded() -> None:
    fit = _fit(_recipe(precision="bf16", epochs=5, lr=0.01))
    assert fit.path["precision"] == "bf16" and fit.stopped == "completed"
    assert fit.history["train_loss"][-1] < fit.history["train_loss"][0]


@pytest.mark.slow
def test_compiled_step_trains_like_eager() -> None:
    """torch.compile on the CPU (inductor writes C++): one full-batch shape, one compile."""
    eager = _fit(_recipe(lr=0.1, batch_size="full"))
    compiled = _fit(_recipe(lr=0.1, batch_size="full", compile=True))
    assert compiled.path["compiled"] is True, compiled.path.get("note")
    assert compiled.history["train_loss"] == pytest.approx(eager.history["train_loss"],
                                                           rel=1e-4)


def test_run_result_records_the_training_path() -> None:
    result = engine.run(_recipe().to_dict())
    assert result["train"]["path"]["precision"] == "fp32"
    assert result["train"]["path"]["device"] == "cpu"


def test_ort_sessions_are_built_once_and_reused() -> None:
    from engine.export import default_threads, onnx_bytes, ort_session

    model = build_model(_recipe().model, (4,), 3, seed=0)
    file = onnx_bytes(model, (4,))
    one = ort_session(file, threads=1)
    assert ort_session(file, threads=1) is one
    assert ort_session(file, threads=2) is not one
    options = ort_session(file).get_session_options()
    assert options.intra_op_num_threads == default_threads()
    assert options.inter_op_num_threads == 1
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_ALL")


def test_train_page_sets_precision_and_compile(tmp_path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_STORE", f"sqlite:///{tmp_path}/store.db")
    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(tmp_path / "artifacts"))
    at = AppTest.from_file("../app.py", default_timeout=90)
    at.run()
    at.switch_page("views/train.py").run()
    assert at.selectbox(key="tr_precision").value == "auto"
    at.selectbox(key="tr_precision").set_value("bf16")
    at.checkbox(key="tr_compile").check()
    at.run()
    assert not at.exception, at.exception
    cfg = at.session_state["train_cfg"]
    assert cfg["precision"] == "bf16" and cfg["compile"] is True
