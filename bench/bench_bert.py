"""BERT-base forward (random weights, 12 layers): finequant w8a8 against torch and int8 peers.

    python bench/bench_bert.py [--quick] [--threads 2]

Peers, all measured in this run and alternated sample by sample: torch fp32 (SDPA attention), torch
dynamic int8 (quantize_dynamic of the Linears, fbgemm), ONNX Runtime int8 (transformer-optimized graph
with fused Attention, then dynamic quantization) and CTranslate2 int8. Every system gets the same ids
and an all-ones attention mask and returns fp32 hidden states [B, T, 768] as a NumPy array / tensor.
Goal: finequant latency <= 0.6x the fastest peer at every shape on a CPU with AMX, <= 0.85x without.
"""
from __future__ import annotations

import copy
import sys
import warnings

import numpy as np

import common
import models

SHAPES = ((1, 32), (1, 128), (8, 128), (32, 128))  # (batch, seq)
QUICK_SHAPES = ((1, 16), (2, 32))
FQ = "finequant w8a8"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-token cosine similarity: a sanity check that every system computes the same model."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def build_systems(src: str, threads: int) -> dict:
    """name -> callable(ids int64 [B, T], mask int64 [B, T]) -> hidden states as np.ndarray."""
    import ctranslate2
    import onnxruntime as ort
    import torch
    from transformers import BertModel

    import finequant

    fq = finequant.Engine(models.finequant_model(src, "w8a8"), threads=threads)

    bert = BertModel.from_pretrained(src).eval()
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        dyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(bert), {torch.nn.Linear}, dtype=torch.qint8)

    def torch_fn(model):
        def run(ids, mask):
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        return run

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(models.ort_bert_int8(src), so, providers=["CPUExecutionProvider"])

    def ort_fn(ids, mask):
        return sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]

    enc = ctranslate2.Encoder(models.ct2_model(src, "int8"), device="cpu", compute_type="int8",
                              intra_threads=threads, inter_threads=1)

    def ct2_fn(ids, mask):
        lengths = ctranslate2.StorageView.from_array(mask.sum(1).astype(np.int32))
        out = enc.forward_batch(ctranslate2.StorageView.from_array(ids.astype(np.int32)), lengths)
        return np.array(out.last_hidden_state)  # copy out, as the others return host arrays

    return {FQ: fq.forward, "torch fp32": torch_fn(bert), "torch dynamic int8": torch_fn(dyn),
            "ORT int8": ort_fn, "CT2 int8": ct2_fn}


def main() -> int:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    common.finish_args(args)
    common.set_threads(args.threads)
    layers = 2 if args.quick else 12
    src = models.random_bert(layers)
    systems = build_systems(src, args.threads)
    peers = [s for s in systems if s != FQ]
    res = common.Results(args.out, "bert", args, {"layers": layers})
    goal = common.bert_goal(res.meta.get("isa", ""))
    print(f"BERT-base random weights, {layers} layers, threads={args.threads}, repeats={args.repeats}; "
          f"latency ms median (min); ratio = finequant / peer latency (< 1: finequant faster)")
    rng = np.random.default_rng(0)
    for batch, seq in QUICK_SHAPES if args.quick else SHAPES:
        ids = rng.integers(1000, 30000, (batch, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        ref = np.asarray(systems["torch fp32"](ids, mask))
        cos = {s: cosine(np.asarray(fn(ids, mask)), ref) for s, fn in systems.items()}
        t = common.measure({s: (lambda fn=fn: fn(ids, mask)) for s, fn in systems.items()}, args.repeats)
        for s in systems:
            res.add(batch=batch, seq=seq, system=s, cosine_to_torch_fp32=cos[s], **t[s])
        fastest = min(peers, key=lambda s: t[s]["median_s"])
        ratio = t[FQ]["median_s"] / t[fastest]["median_s"]
        print(f"\n(batch {batch}, seq {seq}): fastest peer {fastest}; finequant/fastest = {ratio:.2f}x "
              f"(goal <= {goal}: {'PASS' if ratio <= goal else 'FAIL'})")
        for s in systems:
            r = "" if s == FQ else f"  finequant/this {t[FQ]['median_s'] / t[s]['median_s']:.2f}x"
            print(f"  {s:<20}{t[s]['median_s'] * 1e3:10.2f} ({t[s]['min_s'] * 1e3:.2f}) ms"
                  f"  cos {cos[s]:.5f}{r}", flush=True)
    print(f"\nresults appended to {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
