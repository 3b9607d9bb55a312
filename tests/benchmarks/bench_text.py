"""Text models in ONNX Runtime: float32 against dynamic int8, and distillation to half the
layers.

    python -m engine bench --only text      (or this file run directly)

No model can be downloaded here, so the folder is built offline: a sentence-transformers
folder of all-MiniLM-L6-v2's shape (BERT, 6 layers, width 384, 12 heads, MLP 1536, mean
pooling, normalized), random weights, with a WordPiece tokenizer trained by `tokenizers`
on the built-in reviews (its vocabulary is a few hundred words, so the embedding table is
small; every layer that does the work is full size). Random weights are a stand-in: the
int8 fidelity of a trained model can differ, and a distilled student of a random teacher
says how much of the teacher's function half the layers can copy, not how well a trained
model's skill survives.

Figures: one thread; latency at batch 1 x 128 tokens and throughput at batch 32 x 128
tokens, every session timed in the same rounds; fidelity as the mean cosine similarity of
each file's embeddings to PyTorch's on the reviews' test rows (tokenized as the engine
does), and as retrieval@10 agreement (the share of each text's 10 nearest texts it still
finds): random embeddings lie close together, so cosine alone flatters them.
Distillation: the engine's `distill` step with `depth_fraction` 0.5 (every other layer,
from the teacher's weights), label-free, scored by test agreement.

Targets (issue 17): dynamic int8 at least 2x faster with cosine at least 0.99; half the
layers keeping at least 95% of the teacher's fidelity.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

import engine
from engine.compress.onnx_int8 import quantize_onnx
from engine.data import load_data
from engine.data.datasets import reviews
from engine.export import onnx_bytes, ort_inputs, ort_predict, ort_session
from engine.latency import round_robin
from engine.metrics import cosine, retrieval_agreement
from engine.models import build_model
from engine.recipe import DataConfig, ModelConfig

MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512}
TOKENS = 128


def build_folder(root: Path, layers: int = 6) -> Path:
    """The sentence-transformers folder described above, written to `root`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = root / "minilm-shape"
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(list(reviews(2000, 7)[0]), trainers.WordPieceTrainer(
        vocab_size=2000, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(fast), **{**MINILM, "num_hidden_layers": layers})
              ).save_pretrained(folder)
    fast.save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True}))
    return folder


def int8_rows(folder: Path, threads: int) -> tuple[list[list[str]], dict[str, float]]:
    source = f"hf:{folder}"
    data = load_data(DataConfig(source="builtin:reviews", params={"n_samples": 400}), seed=0,
                     model_source=source)
    model = build_model(ModelConfig(source=source), data.input_shape, 384, seed=0).eval()
    fp32 = onnx_bytes(model, data.input_shape)
    int8, _ = quantize_onnx(fp32, method="dynamic_int8", per_channel=False)
    rng = np.random.default_rng(0)
    vocab = model.model.config.vocab_size  # no padding: 128 real tokens of the vocabulary
    one = rng.integers(5, vocab, (1, TOKENS)).astype(np.float32)
    many = rng.integers(5, vocab, (32, TOKENS)).astype(np.float32)
    calls, sessions = {}, {"fp32": fp32, "int8": int8}
    for name, blob in sessions.items():
        session = ort_session(blob, threads=threads)
        feed1, feed32 = ort_inputs(session, one), ort_inputs(session, many)
        calls[f"{name} b1"] = lambda s=session, f=feed1: s.run(None, f)
        calls[f"{name} b32"] = lambda s=session, f=feed32: s.run(None, f)
    timed = round_robin(calls, n_threads=threads)
    ref = ort_predict(ort_session(fp32, threads=threads), data.X_test)
    with torch.no_grad():
        torch_out = model(torch.as_tensor(data.X_test)).numpy()
    original = torch.as_tensor(torch_out)
    outs = {"fp32": torch.as_tensor(ref),
            "int8": torch.as_tensor(ort_predict(ort_session(int8, threads=threads),
                                                data.X_test))}
    rows = []
    for name, blob in sessions.items():
        b1, b32 = timed[f"{name} b1"]["median_ms"], timed[f"{name} b32"]["median_ms"]
        rows.append([f"ONNX Runtime {name}", f"{len(blob) / 2**20:.1f}", f"{b1:.2f}",
                     f"{32 / (b32 / 1e3):.0f}", f"{cosine(outs[name], original):.4f}",
                     f"{retrieval_agreement(outs[name], original):.3f}"])
    speed = timed["fp32 b1"]["median_ms"] / timed["int8 b1"]["median_ms"]
    floor = cosine(original.mean(0, keepdim=True).expand_as(original), original)
    return rows, {"speedup": speed, "cosine": cosine(outs["int8"], original),
                  "retrieval": retrieval_agreement(outs["int8"], original),
                  "smaller": len(fp32) / len(int8), "floor": floor, "rows": len(original)}


def distill_row(folder: Path) -> tuple[list[str], float, float]:
    started = time.perf_counter()
    result = engine.run({
        "data": {"source": "builtin:reviews", "labels": "teacher",
                 "params": {"n_samples": 1000}},
        "model": {"source": f"hf:{folder}"}, "train": {"epochs": 0},
        "compress": [{"technique": "distill", "depth_fraction": 0.5, "width_multiplier": 1.0,
                      "epochs": 10}]})
    seconds = time.perf_counter() - started
    teacher, student = (v["metrics"] for v in result["variants"])
    kept = student["test_agreement"] / teacher["test_agreement"]
    return ([f"distill to 3 of 6 layers (10 epochs, {seconds:.0f} s)",
             f"{student['params'] / teacher['params']:.0%}", f"{student['test_agreement']:.4f}",
             f"{kept:.1%}", f"{student['test_retrieval_at_10']:.3f}"], kept, seconds)


def text_section(quick: bool = False, threads: int = 1) -> str:
    from suite import table  # the suite's Markdown table

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp))
        rows, found = int8_rows(folder, threads)
        out = table(["file", "MiB", f"batch 1 x {TOKENS} ms", f"texts/s at 32 x {TOKENS}",
                     "cosine to PyTorch", "retrieval@10"], rows)
        out += (f"\n\nDynamic int8: **{found['speedup']:.2f}x** faster at batch 1, "
                f"{found['smaller']:.2f}x smaller, cosine {found['cosine']:.4f} to the "
                f"original (target: 2x, 0.99), retrieval@10 agreement "
                f"{found['retrieval']:.3f} over the {found['rows']} test texts. A random "
                f"model's embeddings lie close together: one constant vector, their mean, "
                f"already scores cosine {found['floor']:.3f}, so retrieval@10 is the "
                f"figure that tells here.")
        if not quick:
            row, kept, _ = distill_row(folder)
            out += "\n\n" + table(["student", "weights vs teacher", "test agreement (cosine)",
                                   "of the teacher's", "retrieval@10"], [row])
            out += f"\n\nHalf the layers keep **{kept:.1%}** of the teacher's fidelity " \
                   f"(target: 95%)."
    return out


if __name__ == "__main__":
    print(text_section("--quick" in sys.argv))
