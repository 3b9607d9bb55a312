"""Settings read from the environment: the one place the engine reads it.

Everything below takes its strategies and places as arguments (a store URL, an artifacts
folder, an executor); only the edges (the CLI, the app, the public `engine.run`) call these
functions for their defaults. Each value is checked where it is read: a bad one is one
sentence naming the variable, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import UserError

BACKENDS = ("local", "ray")  # where runs go: worker processes here, or tasks on Ray
UPLOAD_LIMIT_ENV = "WORKBENCH_UPLOAD_LIMIT_MB"
DEFAULT_UPLOAD_LIMIT_MB = 200


def env_int(name: str, default: int) -> int:
    """The positive whole number in environment variable `name`, `default` when unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"the environment variable {name} must be a positive whole number, "
                        f"got {text!r}; fix it and restart the app.")
    return value


def upload_limit_mb() -> int:
    """The largest file accepted, in MiB (WORKBENCH_UPLOAD_LIMIT_MB, default 200)."""
    return env_int(UPLOAD_LIMIT_ENV, DEFAULT_UPLOAD_LIMIT_MB)


def store_url() -> str:
    """`WORKBENCH_STORE` if set, else a SQLite file `./runs/workbench.db` (made absolute)."""
    if os.environ.get("WORKBENCH_STORE"):
        return os.environ["WORKBENCH_STORE"]
    folder = Path("runs").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'workbench.db'}"


def artifacts_root() -> Path:
    """`WORKBENCH_ARTIFACTS` if set, else `./runs/artifacts`; always absolute."""
    return Path(os.environ.get("WORKBENCH_ARTIFACTS") or "runs/artifacts").resolve()


def backend_name(backend: str | None = None) -> str:
    """The backend a run goes to: `backend`, else WORKBENCH_BACKEND, else "local"."""
    kind = (backend or os.environ.get("WORKBENCH_BACKEND") or "local").strip().lower()
    if kind not in BACKENDS:
        raise UserError(f"the backend {kind!r} is unknown; choose one of "
                        f"{', '.join(BACKENDS)} (WORKBENCH_BACKEND).")
    return kind


def ray_address() -> str | None:
    """The cluster address from WORKBENCH_RAY_ADDRESS; None for a private local instance."""
    value = os.environ.get("WORKBENCH_RAY_ADDRESS", "").strip()
    return None if value in ("", "local") else value


def max_workers() -> int:
    """How many local worker processes may run at once: WORKBENCH_MAX_WORKERS, else the
    number of CPU cores (at least 2)."""
    return env_int("WORKBENCH_MAX_WORKERS", max(2, os.cpu_count() or 1))


def hang_limit_s() -> float | None:
    """Seconds without a progress event after which a worker counts as hung:
    WORKBENCH_HANG_TIMEOUT_S (default 1800; 0 turns the check off)."""
    raw = os.environ.get("WORKBENCH_HANG_TIMEOUT_S", "1800")
    try:
        value = float(raw)
    except ValueError as exc:
        raise UserError(f"WORKBENCH_HANG_TIMEOUT_S is {raw!r}; set it to a number of "
                        "seconds (0 turns the check off).") from exc
    return value if value > 0 else None


def python_path(root: Path) -> str:
    """PYTHONPATH for a process that must import this engine from `root`."""
    return os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
