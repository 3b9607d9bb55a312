"""The worker zygote: once it has imported the engine, a run's worker is forked from it
(no second import), in its own session, with the submitter's environment; without it a
worker is a process of its own, as before; it ends with the process that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from engine import jobs, local_backend
from engine.store import Store, run_dir

TINY = {"data": {"source": "builtin:iris"}, "model": {"source": "builtin:mlp", "hidden": [8]},
        "train": {"epochs": 2}}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_ARTIFACTS", str(tmp_path / "art"))
    yield Store(f"sqlite:///{tmp_path}/s.db")
    for proc in list(local_backend._PROCS.values()):
        proc.kill()
        proc.wait(10)


def ready_zygote(timeout: float = 120.0) -> str:
    local_backend.start_zygote()
    deadline = time.monotonic() + timeout
    while (path := local_backend._zygote_socket()) is None:
        assert time.monotonic() < deadline, "the zygote never opened its socket"
        time.sleep(0.2)
    return path


def test_a_run_is_forked_from_the_zygote_in_its_own_session_with_the_callers_environment(
        store, monkeypatch):
    """The hang limit, set after the zygote started, is read by the forked worker."""
    ready_zygote()
    monkeypatch.setenv("WORKBENCH_HANG_TIMEOUT_S", "777")  # set after the zygote started
    started = time.monotonic()
    run_id = jobs.submit(TINY, store=store, threads=1)
    proc = local_backend._PROCS[run_id]
    assert isinstance(proc, local_backend.Forked)
    assert os.getpgid(proc.pid) == proc.pid  # its own session: it outlives the app
    [run] = jobs.wait([run_id], store=store, timeout_s=60)
    assert run["status"] == "done", (run_dir(run_id) / "worker.log").read_text()
    assert time.monotonic() - started < 5.0  # no second import of torch and the engine
    assert run["pid"] == proc.pid
    log = (run_dir(run_id) / "worker.log").read_text()
    assert "started on cpu with 1 threads, stopped after 777 s without progress" in log


def test_without_a_zygote_a_worker_is_a_process_of_its_own(store, monkeypatch, tmp_path):
    monkeypatch.setenv(local_backend.ZYGOTE_ENV, str(tmp_path / "no-such-socket"))
    run_id = jobs.submit(TINY, store=store, threads=1)
    assert isinstance(local_backend._PROCS[run_id], subprocess.Popen)
    [run] = jobs.wait([run_id], store=store, timeout_s=120)
    assert run["status"] == "done"


def test_the_zygote_ends_with_the_process_that_started_it(tmp_path):
    parent = subprocess.run(
        [sys.executable, "-c", (
            "import os, time\n"
            "os.environ.pop('WORKBENCH_ZYGOTE', None)\n"
            "from engine import local_backend as lb\n"
            "lb.start_zygote()\n"
            "while lb._zygote_socket() is None: time.sleep(0.2)\n"
            "print(lb._ZYGOTE[0].pid, lb._zygote_socket())\n")],
        capture_output=True, text=True, timeout=180, cwd=os.getcwd())
    assert parent.returncode == 0, parent.stderr
    pid, path = parent.stdout.split()
    deadline = time.monotonic() + 10
    while local_backend.is_alive(int(pid)) or os.path.exists(os.path.dirname(path)):
        assert time.monotonic() < deadline, "the zygote or its folder outlived its parent"
        time.sleep(0.2)
