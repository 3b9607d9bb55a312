"""The study: Optuna's sampler, pruner and storage for a `tune` section, and the search.

Trials live in an Optuna RDB storage passed in by the caller (the runner gives the run
store's database). A study with the same name resumes, and trials already finished count
toward `n_trials`. Parallel workers run on an executor (`engine.executor`) and share the
study through the storage; this process polls it to report trials as they finish.
Optuna is imported inside the functions so that importing the engine stays fast.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import UserError
from engine.executor import Executor, ProcessPool
from engine.recipe import Recipe
from engine.tune.objective import Context, make_context, objective, probe
from engine.tune.results import result, trial_dict
from engine.tune.space import OBJECTIVES, grid, validate_tune

if TYPE_CHECKING:
    import optuna

POLL_S = 0.5  # how often this process looks for trials its workers finished
_FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def _sampler(tune: dict[str, Any], seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    name = tune["sampler"]
    if name == "grid":
        return optuna.samplers.GridSampler(grid(tune["space"]), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    if name == "nsga2":
        n = tune["n_trials"] or 20
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n // 3)))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)


def _pruner(tune: dict[str, Any]) -> optuna.pruners.BasePruner:
    import optuna

    if tune["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if tune["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def optuna_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage on `url`, waiting for SQLite's lock rather than failing."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # several processes write: wait for the lock, don't fail
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(url, **kwargs)


def _open_study(url: str, name: str, tune: dict[str, Any], seed: int, *, create: bool
                ) -> optuna.Study:
    import optuna

    directions = [OBJECTIVES[o] for o in tune["objectives"]]
    kwargs = {"storage": optuna_storage(url), "sampler": _sampler(tune, seed),
              "pruner": _pruner(tune), "study_name": name}
    if not create:
        return optuna.load_study(**kwargs)
    study = optuna.create_study(**kwargs, directions=directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise UserError(f"tune.study {name!r} already exists with other objectives; pick a "
                        f"new study name or the same objectives.")
    return study


def load_study(name: str, storage: str) -> optuna.Study:
    """A search's study as it is now (it grows while the search runs), for its figures."""
    import optuna

    return optuna.load_study(study_name=name, storage=optuna_storage(storage))


def _counted(study: optuna.Study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False,
                                states=(TrialState.COMPLETE, TrialState.PRUNED)))


def search(recipe: Recipe, *, storage: str, executor: Executor | None = None,
           on_trial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the study that `recipe.tune` describes; return the tuning result.

    The study lives in `storage` (an SQLAlchemy URL; Optuna keeps its tables there), so a
    study of the same name resumes. With `tune.workers` > 1 the workers run on `executor`
    (spawned local processes when None) and share the study through the storage; an
    executor that always fans out (Ray) runs even a single worker as a task.
    `on_trial(trial)` is called, in this process, for each trial that finishes during this
    call: {"number", "params", "values", "state", "duration_s", "study"} plus
    "fold_scores" and "std" for k-fold validation."""
    import optuna

    if recipe.tune is None:
        raise UserError("the recipe has no tune section; add one to search.")
    tune = validate_tune(recipe.tune)
    seed = recipe.seed if tune["seed"] is None else tune["seed"]
    space = tune["space"]
    base = recipe.to_dict()
    base["tune"] = None
    probe(base, space)
    executor = executor or ProcessPool()
    name = tune["study"] or f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    n_total = tune["n_trials"]
    if n_total is None:  # grid: the whole grid
        n_total = math.prod(len(spec) for spec in space.values())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(storage, name, tune, seed, create=True)
    seen = {t.number for t in study.get_trials(deepcopy=False)
            if t.state.name in _FINISHED}
    remaining = n_total - _counted(study)
    emit = on_trial or (lambda trial: None)

    def report_new(trials: list[optuna.trial.FrozenTrial]) -> None:
        for t in sorted(trials, key=lambda t: t.number):
            if t.number not in seen and t.state.name in _FINISHED:
                seen.add(t.number)
                emit({**trial_dict(t, space), "study": name})

    if remaining > 0:
        workers = min(tune["workers"], remaining)
        if workers == 1 and not executor.always_fan_out:
            _optimize(study, make_context(recipe, tune, seed), remaining, n_total,
                      callbacks=[lambda s, t: report_new([t])])
        else:  # each worker an equal share, so that together they run exactly `remaining`
            threads = executor.threads_per_task(workers)
            quotas = [remaining // workers + (i < remaining % workers) for i in range(workers)]
            executor.run_all([(run_trials, (base, tune, storage, name, seed + i, seed, quota,
                                            n_total, threads))
                              for i, quota in enumerate(quotas)],
                             poll=lambda: report_new(study.get_trials(deepcopy=False)),
                             poll_s=POLL_S)
    report_new(study.get_trials(deepcopy=False))
    return result(study, tune, name)


def _optimize(study: optuna.Study, ctx: Context, quota: int, n_total: int, *,
              callbacks: list[Callable[..., None]] = ()) -> None:
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study.optimize(lambda trial: objective(trial, ctx), n_trials=quota,
                   timeout=ctx.tune["timeout_s"],
                   callbacks=[MaxTrialsCallback(n_total, states=(TrialState.COMPLETE,
                                                                 TrialState.PRUNED)),
                              *callbacks])


def run_trials(base: dict[str, Any], tune: dict[str, Any], url: str, name: str,
               sampler_seed: int, seed: int, quota: int, n_total: int, threads: int) -> None:
    """Load the shared study and run `quota` of its trials here: the task a search hands
    its executor (a spawned process, a Ray task)."""
    import optuna

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recipe = Recipe.from_dict(base).replace(tune=tune)
    study = _open_study(url, name, tune, sampler_seed, create=False)
    _optimize(study, make_context(recipe, tune, seed), quota, n_total)
