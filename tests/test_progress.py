"""Every stage of a run moves its progress bar and says where it is."""

from __future__ import annotations

from engine.progress import progress_of


def run(progress: dict, status: str = "running", **extra) -> dict:
    return {"id": "ab" * 16, "name": "r", "status": status, "progress": progress,
            "recipe": {"tune": None}, "claimed": 1.0, **extra}


def test_each_stage_has_its_own_fraction_and_line():
    assert progress_of(run({"stage": "train", "epoch": 3, "epochs": 12})) == (
        0.25, "r · training: epoch 3 of 12")
    tune = run({"stage": "tune", "trials": 4}, recipe={"tune": {"n_trials": 16}})
    assert progress_of(tune) == (0.25, "r · searching: 4 of 16 trials")
    diag = run({"stage": "diagnose", "done": 6, "total": 8, "epoch": 30, "epochs": 30,
                "message": "bias-variance rounds: 6 of 8"})
    assert progress_of(diag) == (0.75, "r · bias-variance rounds: 6 of 8")
    chain = run({"stage": "compress", "step": 2, "steps": 4, "epoch": 1, "epochs": 2,
                 "variant": "share", "message": "step 2 of 4: share"})
    assert progress_of(chain) == (0.375, "r · step 2 of 4: share")


def test_queued_and_ended_runs():
    assert progress_of(run({}, "queued", claimed=None)) == (
        0.0, "r · queued: waiting for a free worker")
    assert progress_of(run({"stage": "done"}, "done")) == (1.0, "r · done")
    assert progress_of(run({}, "failed")) == (0.0, "r · failed")
