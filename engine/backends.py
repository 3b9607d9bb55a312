"""The interface of a backend: where runs and a search's trials go.

A backend starts a stored run somewhere (`submit`), says whether it is still going
(`alive`), ends it by force (`kill`), and gives the executor a search on it fans its trials
out to (`executor`). `engine.local_backend` runs worker processes on this machine,
`engine.ray_backend` runs tasks on a Ray cluster; `engine.jobs` picks one by name and
never branches on which it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from engine.executor import Executor
from engine.recipe import Recipe


class Backend(ABC):
    """One way of running stored runs."""

    name = "backend"
    #: whether a worker starts the next queued run when its own ends (a local queue)
    drains_queue = False

    def connect(self) -> None:  # noqa: B027 - most backends need no connection
        """Check that the backend can take runs now; a UserError says why not."""

    @abstractmethod
    def submit(self, run_id: str, store: Any, recipe: Recipe, *, threads: int | None = None,
               resources: dict[str, float] | None = None) -> None:
        """Start (or queue) the stored run `run_id`."""

    @abstractmethod
    def alive(self, run: dict[str, Any]) -> bool:
        """Whether the run's worker is still going (one on another host counts as going:
        only its own host can tell)."""

    @abstractmethod
    def kill(self, run: dict[str, Any]) -> bool:
        """End the run's worker by force; False when it is out of this process's reach."""

    @abstractmethod
    def executor(self) -> Executor:
        """Where a run on this backend runs its search's parallel trials."""
