"""Hugging Face text models: a local folder (`hf:PATH`) with its tokenizer, offline.

A text folder is config.json, model.safetensors and the tokenizer's files (tokenizer.json,
or tokenizer_config.json with its vocabulary), loaded by transformers with
`local_files_only=True` and `trust_remote_code` off. It becomes one of two models:
- a *sequence classifier* (`AutoModelForSequenceClassification`): a folder whose config
  names a classification head, or any encoder given labels to train one (a head of
  another size is new, and a note says so);
- an *embedder*: a sentence-transformers folder (modules.json: Transformer, Pooling,
  optionally Normalize) with the pooling and normalization its files say, or a plain
  encoder asked for its own outputs (label-free), pooled by the mean over its tokens.

Every model in the engine takes one float tensor, so `HFTextModel` takes the token ids
(batch, tokens) as numbers and derives the attention mask from the padding id: training,
evaluation, compression and latency see a model like any other. Text is tokenized once,
here, padded to the longest text (at most `data.max_length` and the model's position
table, truncation counted and said).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from engine.architectures import MAX_PARAMS
from engine.errors import UserError
from engine.hf import folder_config, transformers_held

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_DIR = "tokenizer"  # where a bundle keeps its text model's tokenizer
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len")
ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE = ("models.Transformer", "models.Pooling",
                                            "models.Normalize")


class HFTextModel(nn.Module):
    """A transformers text model as the engine runs every model: token ids in (batch,
    tokens; as numbers), logits or a pooled embedding out; the attention mask is where the
    ids are not the padding id."""

    takes_tokens = True  # its input's second axis is any number of tokens (ONNX export)

    def __init__(self, model: nn.Module, *, pad_id: int, head: str, pooling: str = "mean",
                 normalize: bool = False) -> None:
        super().__init__()
        self.model = model
        self.pad_id, self.head, self.pooling, self.normalize = pad_id, head, pooling, normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        mask = (ids != self.pad_id).long()
        out = self.model(input_ids=ids, attention_mask=mask)
        if self.head == "classifier":
            return out.logits
        return pool(out.last_hidden_state, mask, self.pooling, self.normalize)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str,
         normalize: bool) -> torch.Tensor:
    """One vector per text from its tokens' hidden states, as sentence-transformers pools."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":
        out = hidden[:, 0]
    elif pooling == "max":
        out = hidden.masked_fill(weights == 0, -1e9).max(dim=1).values
    else:
        total = (hidden * weights).sum(dim=1)
        count = weights.sum(dim=1).clamp(min=1e-9)
        out = total / (count.sqrt() if pooling == "mean_sqrt_len" else count)
    return nn.functional.normalize(out, dim=-1) if normalize else out


def is_text_folder(source: str) -> bool:
    """Whether `hf:PATH` is a text model's folder (it has a tokenizer or is a
    sentence-transformers folder), as opposed to a vision classifier's."""
    if not source.startswith("hf:"):
        return False
    folder = Path(source.removeprefix("hf:"))
    return folder.is_dir() and ((folder / "modules.json").is_file() or any(
        (folder / name).is_file() for name in TOKENIZER_FILES))


def sentence_transformer(folder: Path) -> dict[str, Any] | None:
    """A sentence-transformers folder's parts: {"path" (the transformer's folder), "pooling",
    "normalize", "max_length"}; None for a plain transformers folder."""
    if not (folder / "modules.json").is_file():
        return None
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        types = [str(m["type"]) for m in modules]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder.name}/modules.json is not a sentence-transformers module "
                        f"list; save the folder again with model.save().") from None
    known = (ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE)
    unknown = [t for t in types if not t.endswith(known)]
    if unknown or not any(t.endswith(ST_TRANSFORMER) for t in types):
        raise UserError(f"{folder.name} holds sentence-transformers modules the workbench does "
                        f"not run ({', '.join(unknown) or 'no Transformer'}); it runs a "
                        f"Transformer, a Pooling and a Normalize module.")
    parts: dict[str, Any] = {"path": folder, "pooling": "mean", "normalize": False,
                             "max_length": None}
    for module, kind in zip(modules, types, strict=True):
        where = folder / str(module.get("path") or "")
        if kind.endswith(ST_TRANSFORMER):
            parts["path"] = where
        elif kind.endswith(ST_NORMALIZE):
            parts["normalize"] = True
        elif kind.endswith(ST_POOLING):
            parts["pooling"] = _pooling_mode(where / "config.json")
    bert = folder / "sentence_bert_config.json"
    if bert.is_file():
        with contextlib.suppress(OSError, ValueError):
            parts["max_length"] = json.loads(bert.read_text(encoding="utf-8")).get(
                "max_seq_length")
    return parts


def _pooling_mode(path: Path) -> str:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "mean"  # sentence-transformers' own default
    modes = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
             "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens":
             "mean_sqrt_len"}
    chosen = [mode for key, mode in modes.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode") and v
              and k not in modes]
    if others or len(chosen) > 1:
        raise UserError(f"the folder's pooling ({', '.join(others or chosen)}) is not one the "
                        f"workbench runs; it pools by one of {', '.join(POOLINGS)}.")
    return chosen[0] if chosen else "mean"


def _transformer_folder(source: str) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    folder = Path(source.removeprefix("hf:"))
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; hf:PATH takes a local Hugging Face folder "
                        f"(config.json, model.safetensors, the tokenizer's files).")
    st = sentence_transformer(folder)
    path = st["path"] if st else folder
    return path, folder_config(path), st


def load_tokenizer(source: str) -> Any:
    """The folder's tokenizer, offline; a folder without one is one sentence."""
    path, _, _ = _transformer_folder(source)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{path.name} has no tokenizer (tokenizer.json or "
                        f"tokenizer_config.json with its vocabulary); save the tokenizer into "
                        f"the folder with tokenizer.save_pretrained.")
    try:
        with transformers_held() as hf:
            tokenizer = hf.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                         trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"the tokenizer of {path.name} could not be read "
                        f"({str(exc).splitlines()[0][:120]}); save it again with "
                        f"tokenizer.save_pretrained.") from None
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of {path.name} has no padding token, which batches of "
                        f"texts of different lengths need; set tokenizer.pad_token and save "
                        f"it again.")
    return tokenizer


def position_limit(source: str) -> int | None:
    """The most tokens the model takes (its position table; a sentence-transformers
    folder's max_seq_length if smaller)."""
    _, config, st = _transformer_folder(source)
    limits = [config.get(k) for k in ("max_position_embeddings", "n_positions")]
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        limits = [v - 2 if isinstance(v, int) else v for v in limits]  # offset by padding_idx
    if st and st.get("max_length"):
        limits.append(st["max_length"])
    found = [int(v) for v in limits if isinstance(v, int) and v > 0]
    return min(found) if found else None


def tokenize(texts: np.ndarray, source: str, max_length: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Token ids (rows, tokens) of every text, padded to the longest after truncation, and
    what the Data page says about them: lengths before truncation, how many were cut."""
    tokenizer = load_tokenizer(source)
    limit = min(v for v in (max_length, position_limit(source)) if v)
    texts = [str(t) for t in texts]
    full = tokenizer(texts, truncation=False)["input_ids"]
    lengths = np.array([len(ids) for ids in full], dtype=np.int64)
    enc = tokenizer(texts, truncation=True, max_length=limit, padding="longest")
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    truncated = int((lengths > limit).sum())
    info = {"tokenizer": source, "max_length": limit, "pad_id": int(tokenizer.pad_token_id),
            "lengths": lengths.tolist(), "truncated": truncated, "tokens": int(ids.shape[1])}
    if truncated:
        info["note"] = (f"{truncated} of {len(texts)} texts are longer than {limit} tokens and "
                        f"were truncated to {limit}.")
    return ids, info


def estimated_params(config: dict[str, Any]) -> int:
    """About how many weights a transformer config makes (embeddings + layers)."""
    def first(*keys: str) -> int:
        return next((int(config[k]) for k in keys if isinstance(config.get(k), int)), 0)

    hidden = first("hidden_size", "dim", "d_model", "n_embd")
    inner = first("intermediate_size", "hidden_dim", "d_ff", "n_inner") or 4 * hidden
    layers = first("num_hidden_layers", "n_layers", "num_layers", "n_layer")
    vocab, positions = first("vocab_size"), first("max_position_embeddings", "n_positions")
    return (vocab + positions) * hidden + layers * (4 * hidden * hidden + 2 * hidden * inner)


def build_text_source(source: str, n_out: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The model of a text folder for `n_out` outputs: its embedder when `n_out` is its
    embedding width and it has no classification head, else a sequence classifier."""
    path, config, st = _transformer_folder(source)
    if len(input_shape) != 1:
        raise UserError(f"{path.name} is a text model: it takes token ids of text, and this "
                        f"data has samples of shape {input_shape}; pick text data (the "
                        f"built-in reviews, or a table with its text column set).")
    params = estimated_params(config)
    if params > MAX_PARAMS:
        raise UserError(f"{path.name}'s config makes about {params:,} weights, over the "
                        f"workbench's limit of {MAX_PARAMS:,} for one machine; use a smaller "
                        f"model.")
    tokenizer = load_tokenizer(source)
    hidden = next((int(config[k]) for k in ("hidden_size", "dim", "d_model")
                   if isinstance(config.get(k), int)), None)
    has_head = any(str(a).endswith("ForSequenceClassification")
                   for a in config.get("architectures") or [])
    head = "embedder" if not has_head and n_out == hidden else "classifier"
    settings = {k: v for k, v in config.items()
                if k not in ("id2label", "label2id", "architectures", "transformers_version",
                             "torch_dtype", "dtype", "_name_or_path")}
    if head == "classifier":
        settings["num_labels"] = n_out
    builder = {"kind": "hf_text", "config": settings, "head": head,
               "pad_id": int(tokenizer.pad_token_id),
               "pooling": st["pooling"] if st else "mean",
               "normalize": bool(st and st["normalize"]), "tokenizer": str(path)}
    model = build_hf_text(builder)
    notes = []
    if (path / "model.safetensors").is_file():
        notes += _load_weights(model, path, config, n_out)
    elif (path / "pytorch_model.bin").is_file():
        raise UserError(f"{path.name} holds its weights as pytorch_model.bin, a pickle, which "
                        f"is never loaded; save the folder again with save_pretrained "
                        f"(safetensors).")
    else:
        notes.append(f"{path.name} has no model.safetensors, so the model starts from random "
                     f"weights.")
    model.workbench_notes = notes
    return model


def build_hf_text(builder: dict[str, Any]) -> nn.Module:
    """The text model a bundle's "hf_text" builder describes, random weights."""
    settings = dict(builder["config"])
    model_type = settings.pop("model_type")
    try:
        with transformers_held() as hf:
            config = hf.AutoConfig.for_model(model_type, **settings)
            auto = hf.AutoModelForSequenceClassification if builder["head"] == "classifier" \
                else hf.AutoModel
            inner = auto.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"transformers cannot build a {model_type!r} text model from this "
                        f"config ({str(exc)[:120]}); use a text model's folder.") from None
    model = HFTextModel(inner, pad_id=int(builder["pad_id"]), head=builder["head"],
                        pooling=builder.get("pooling", "mean"),
                        normalize=bool(builder.get("normalize")))
    model.workbench_builder = builder
    return model


def _load_weights(model: HFTextModel, path: Path, config: dict[str, Any],
                  n_out: int) -> list[str]:
    """The folder's weights into the built model, matched by name with the base model's
    prefix added or taken off; a classification head of another size stays new."""
    try:
        state = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path.name}/model.safetensors is not a valid safetensors file "
                        f"({str(exc)[:120]}); save the folder again with save_pretrained.") \
            from None
    inner = model.model
    prefix = inner.base_model_prefix
    expected = inner.state_dict()
    mapped = {}
    for key, value in state.items():
        if key in expected:
            mapped[key] = value
        elif f"{prefix}.{key}" in expected:
            mapped[f"{prefix}.{key}"] = value
        elif key.startswith(f"{prefix}.") and key.removeprefix(f"{prefix}.") in expected:
            mapped[key.removeprefix(f"{prefix}.")] = value
    head = [k for k in expected if k in mapped and mapped[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in mapped and not _optional(k)]
    new_head = [k for k in missing if not k.startswith(f"{prefix}.")]
    encoder_missing = [k for k in missing if k not in new_head]
    if encoder_missing:
        raise UserError(f"{path.name}/model.safetensors lacks {len(encoder_missing)} of the "
                        f"encoder's weights (first: {encoder_missing[0]}); it does not match "
                        f"its config.json, so save the folder again with save_pretrained.")
    inner.load_state_dict({k: v for k, v in mapped.items() if k not in head}, strict=False)
    fresh = head + new_head
    if not fresh:
        return []
    before = len(config.get("id2label") or {}) or config.get("num_labels")
    had = "no classification head" if new_head and not head else \
        f"a classification head of {before} classes"
    return [f"the folder has {had} and this data has {n_out} classes, so the head "
            f"({', '.join(fresh)}) is new and trained from random weights (transfer "
            f"learning)."]


def _optional(key: str) -> bool:
    """Buffers a checkpoint may leave out (position ids, token type ids)."""
    return key.endswith(("position_ids", "token_type_ids"))


def text_outputs(source: str) -> tuple[int, list[str] | None]:
    """A text folder's own outputs, for label-free runs: a classifier's width and labels,
    else the width of its embeddings and None (its outputs are vectors, not classes)."""
    _, config, _ = _transformer_folder(source)
    if any(str(a).endswith("ForSequenceClassification")
           for a in config.get("architectures") or []):
        id2label = config.get("id2label") or {}
        if id2label:
            return len(id2label), [str(id2label.get(str(i), id2label.get(i, i)))
                                   for i in range(len(id2label))]
        count = int(config.get("num_labels", 2))
        return count, [str(i) for i in range(count)]
    width = next((int(config[k]) for k in ("hidden_size", "dim", "d_model")
                  if isinstance(config.get(k), int)), None)
    if width is None:
        raise UserError("this text model's config names no hidden size, so its embedding "
                        "width is unknown; save the folder again with save_pretrained.")
    return width, None


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList | None]:
    """The name and module of a transformer's list of layers (BERT's encoder.layer,
    DistilBERT's transformer.layer, ...): the longest ModuleList in it."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return "", None
    return max(lists, key=lambda item: len(item[1]))


def copy_tokenizer(source: str | Path, target: Path) -> None:
    """The tokenizer's files (and config.json, which names its class) into `target`."""
    source = Path(str(source).removeprefix("hf:"))
    if source.resolve() == target.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in (*TOKENIZER_FILES, "special_tokens_map.json", "config.json", "merges.txt",
                 "added_tokens.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def tokenizer_source(model_source: str) -> str | None:
    """Where a model's tokenizer is, as "hf:PATH": a text folder itself, or a bundle's
    tokenizer folder; None for a model without one."""
    if is_text_folder(model_source):
        return model_source
    if model_source.lower().endswith(".onnx"):  # an exported transformer (optimum's layout:
        beside = f"hf:{Path(model_source).parent}"  # the tokenizer's files beside the file)
        return beside if is_text_folder(beside) else None
    folder = Path(model_source) / TOKENIZER_DIR
    if (folder.parent / "model.json").is_file() and is_text_folder(f"hf:{folder}"):
        return f"hf:{folder}"
    return None
