"""Built-in datasets: every one shipped by a package (scikit-learn), nothing downloaded.

Each entry returns raw `(X, y, meta)` arrays; `meta` says the task, whether the samples are
images, and the feature and class names. Synthetic sets take their own seed (`random_state`)
so the data stays fixed while the recipe's seed varies.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from sklearn import datasets as skdatasets

from engine.errors import UserError
from engine.registry import Param, Registry

Arrays = tuple[np.ndarray, np.ndarray, dict[str, Any]]

DATASETS = Registry("datasets", "dataset",
                    "Built-in datasets shipped by packages; nothing is downloaded.")

# Synthetic sets take their own seed so the data stays fixed while the recipe seed varies.
_RANDOM_STATE = Param("random_state", "int", 0, "seed of the generator (fixes the data itself)",
                      low=0, high=2**31 - 1)


def _n_samples(default: int) -> Param:
    return Param("n_samples", "int", default, "rows to generate", low=20, high=1_000_000)


def _points(X: np.ndarray, y: np.ndarray) -> Arrays:
    names = [f"x{i}" for i in range(X.shape[1])]
    return X.astype(np.float32), y, {"feature_names": names, "task": "classification",
                                     "is_image": False}


@DATASETS.register("digits", "Handwritten digits 0-9 as 8x8 grayscale images (1,797 images).")
def digits() -> Arrays:
    bunch = skdatasets.load_digits()
    X = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values 0..16 -> [0, 1]
    return X, bunch.target, {"class_names": [str(c) for c in bunch.target_names],
                             "task": "classification", "is_image": True}


def _sklearn_table(loader: str, task: str) -> Arrays:
    bunch = getattr(skdatasets, loader)()
    meta = {"feature_names": [str(f) for f in bunch.feature_names], "task": task,
            "is_image": False}
    if task == "classification":
        meta["class_names"] = [str(c) for c in bunch.target_names]
    return bunch.data.astype(np.float32), bunch.target, meta


for _name, _task, _description in (
        ("breast_cancer", "classification",
         "Benign or malignant tumour from 30 cell measurements (569 rows)."),
        ("wine", "classification", "Grape cultivar of a wine from 13 chemical measurements "
                                   "(178 rows)."),
        ("iris", "classification", "Iris species from 4 petal and sepal measurements (150 rows)."),
        ("diabetes", "regression", "Disease progression after one year from 10 patient "
                                   "measurements (regression, 442 rows).")):
    DATASETS.register(_name, _description)(
        functools.partial(_sklearn_table, f"load_{_name}", _task))


@DATASETS.register("moons", "Two interleaving half-circles in 2-D, a small non-linear problem.",
                   params=(_n_samples(500),
                           Param("noise", "float", 0.2, "std of Gaussian noise added to points",
                                 low=0.0, high=1.0),
                           _RANDOM_STATE))
def moons(n_samples: int, noise: float, random_state: int) -> Arrays:
    return _points(*skdatasets.make_moons(n_samples, noise=noise, random_state=random_state))


@DATASETS.register("circles", "A small circle inside a larger one in 2-D, a non-linear problem.",
                   params=(_n_samples(500),
                           Param("noise", "float", 0.1, "std of Gaussian noise added to points",
                                 low=0.0, high=1.0),
                           Param("factor", "float", 0.5, "inner radius over outer radius",
                                 low=0.0, high=0.99),
                           _RANDOM_STATE))
def circles(n_samples: int, noise: float, factor: float, random_state: int) -> Arrays:
    return _points(*skdatasets.make_circles(n_samples, noise=noise, factor=factor,
                                 random_state=random_state))


@DATASETS.register("classification", "A random classification table with a chosen number of "
                   "informative features and label noise.",
                   params=(_n_samples(1000),
                           Param("n_features", "int", 20, "columns in total", low=2, high=10_000),
                           Param("n_informative", "int", 5, "columns that carry the label",
                                 low=1, high=10_000),
                           Param("n_classes", "int", 2, "number of classes", low=2, high=100),
                           Param("flip_y", "float", 0.01, "fraction of labels assigned at random "
                                 "(label noise)", low=0.0, high=1.0),
                           Param("class_sep", "float", 1.0, "distance between the classes; "
                                 "larger is easier", low=0.01, high=100.0),
                           _RANDOM_STATE))
def classification(n_samples: int, n_features: int, n_informative: int, n_classes: int,
                   flip_y: float, class_sep: float, random_state: int) -> Arrays:
    if n_informative > n_features:
        raise UserError(f"data.params.n_informative ({n_informative}) must not exceed "
                        f"data.params.n_features ({n_features}); lower it.")
    if 2 * n_classes > 2**n_informative:  # sklearn puts two clusters per class on hypercube corners
        raise UserError(f"data.params.n_informative ({n_informative}) is too small for "
                        f"{n_classes} classes; raise it to at least "
                        f"{int(np.ceil(np.log2(2 * n_classes)))}.")
    X, y = skdatasets.make_classification(
        n_samples, n_features, n_informative=n_informative,
        n_redundant=min(2, n_features - n_informative), n_classes=n_classes, flip_y=flip_y,
        class_sep=class_sep, random_state=random_state)
    return _points(X, y)




@DATASETS.register("shapes", "Coloured squares, discs and triangles on noisy backgrounds, as "
                   "RGB images (3x32x32 by default): a small image set for the real "
                   "architectures (ResNet, MobileNet, ...), made here, nothing downloaded.",
                   params=(_n_samples(600),
                           Param("size", "int", 32, "image height and width in pixels",
                                 low=16, high=256),
                           _RANDOM_STATE))
def shapes(n_samples: int, size: int, random_state: int) -> Arrays:
    rng = np.random.default_rng(random_state)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    y = rng.integers(0, 3, n_samples)
    X = np.empty((n_samples, 3, size, size), dtype=np.float32)
    for i, label in enumerate(y):
        background, colour = rng.uniform(0.0, 0.45, 3), rng.uniform(0.55, 1.0, 3)
        cx, cy = rng.uniform(0.3, 0.7, 2)
        r = rng.uniform(0.12, 0.28)
        if label == 0:
            inside = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)
        elif label == 1:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        else:  # apex up: wider towards the bottom
            inside = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < (yy - cy + r) / 2)
        image = np.where(inside[None], colour[:, None, None], background[:, None, None])
        X[i] = np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)
    return X, y, {"class_names": ["square", "disc", "triangle"], "task": "classification",
                  "is_image": True}


_SUBJECTS = ("the film", "this phone", "the hotel", "the service", "the book", "our meal",
             "the app", "the concert", "this laptop", "the staff")
_GOOD = ("great", "wonderful", "excellent", "reliable", "delightful", "superb", "friendly",
         "fast", "charming", "solid")
_BAD = ("awful", "boring", "broken", "slow", "rude", "disappointing", "terrible", "noisy",
        "clumsy", "dull")
_SO = ("really", "quite", "very", "truly", "rather", "")
_ENDS = ("", "overall", "to be honest", "and I would say so again", "in every way",
         "from start to finish")


@DATASETS.register("reviews", "Short product and film reviews, positive or negative, as text "
                   "(for Hugging Face text models; a tokenizer turns them into token ids): "
                   "made here from word lists, with negations and 'but' clauses, nothing "
                   "downloaded.",
                   params=(_n_samples(1000), _RANDOM_STATE))
def reviews(n_samples: int, random_state: int) -> Arrays:
    rng = np.random.default_rng(random_state)

    def clause(positive: bool) -> str:
        negated = rng.random() < 0.25  # "not great" is negative, "not awful" positive
        words = _GOOD if positive != negated else _BAD
        so = str(rng.choice(("very", "that", "") if negated else _SO))
        return " ".join(w for w in (str(rng.choice(_SUBJECTS)), "was", "not" if negated else "",
                                    so, str(rng.choice(words))) if w)

    y = rng.integers(0, 2, n_samples)
    texts = []
    for label in y:
        text = clause(bool(label))
        if rng.random() < 0.3:  # the clause after "but" decides
            text = f"{clause(not label)} but {text}"
        end = str(rng.choice(_ENDS))
        texts.append(f"{text} {end}".strip() + ".")
    return np.array(texts, dtype=object), y, {"class_names": ["negative", "positive"],
                                              "task": "classification", "is_image": False,
                                              "is_text": True}
