"""finequant.Engine: the C++ inference engine with tokenization, pooling and streaming on top.

The engine does the math (finequant._core._Engine); this module only turns text into ids and
back, validates Python-side input and converts Hugging Face folders to fp32 model files on the fly.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _core

MODEL_FILE = "model.safetensors"


def _is_finequant_dir(path: str) -> bool:
    from safetensors import safe_open

    file = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(file):
        return False
    try:
        with safe_open(file, "np") as f:
            return (f.metadata() or {}).get("format") == "finequant"
    except Exception:  # not a readable safetensors file: let the engine's reader report it
        return True


def resolve_model(path: str) -> str:
    """A finequant model directory for `path`: itself, or an fp32 conversion of a Hugging Face folder
    (cached under the temp dir, keyed by the folder's path and modification time)."""
    path = os.path.abspath(path)
    if os.path.isfile(path) or _is_finequant_dir(path):
        return path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: neither a finequant model directory nor a Hugging Face folder")
    from .modelfile import quantize_folder
    from .schemes import parse_scheme

    stamp = max(os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path))
    key = hashlib.sha1(f"{path}:{stamp}".encode()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), "finequant-fp32", key)
    if not os.path.isfile(os.path.join(out, MODEL_FILE)):
        quantize_folder(path, out, parse_scheme("fp32"))
    return out


class Engine:
    """Load a finequant model directory (or a Hugging Face folder, converted to fp32) and run it.

    forward(input_ids, attention_mask=None) -> logits [B, T, vocab] (decoders) or last hidden
    states [B, T, hidden] (encoders, and an encoder-decoder's encoder); with decoder_input_ids
    (encoder-decoders, e.g. BART) -> the decoder's logits [B, Td, vocab];
    embed(texts) -> sentence embeddings (encoders);
    generate(prompt or ids, ...) -> text or ids (decoders: the continuation; encoder-decoders: the
    decoder's output for the prompt), streaming through `callback` or stream().
    """

    def __init__(self, model_dir: str, threads: Optional[int] = None, device: str = "cpu",
                 float_precision: str = "fp32", max_memory: int = 0, strategy: str = "auto"):
        """float_precision: how Linears with floating-point inputs (fp32 models, weight-only schemes,
        an unquantized LM head) multiply. "fp32": exact fp32 products. "bf16": the weight stored as
        bf16 (half its memory and of the bytes a decode step reads), the inputs rounded to bf16, fp32
        sums; used on CPUs with AVX512-BF16, elsewhere (and on CUDA) those Linears stay fp32.
        max_memory: bytes the weights plus one call's estimated working memory may take; a load or
        call that would need more raises MemoryError naming the limit (0: the physical memory
        available at the time).
        strategy: the per-shape kernel table `finequant tune` writes (docs/DESIGN.md section 12):
        "auto" uses strategy.json in the model directory when it was measured on this CPU (else it is
        ignored, see strategy_note), "off" runs every GEMM as stored, or a table's path. A table may
        run some integer GEMMs weight-only (dequantized weights, float activations): faster where it
        says so, with the numerics of a weight-only model for those parts."""
        self.path = resolve_model(model_dir)
        self._engine = _core._Engine.load(self.path, threads or 0, device, float_precision, int(max_memory),
                                          strategy)
        self.float_precision = float_precision
        folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        tok = os.path.join(folder, "tokenizer.json")
        self.tokenizer = None
        if os.path.isfile(tok):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(tok)
            # Some tokenizer.json files pad and truncate every encoding (all-MiniLM-L6-v2: to 128
            # tokens): padding would count [PAD] as real tokens and truncation would silently cut
            # texts (perplexity). encode_batch pads, masks and truncates to max_positions itself.
            self.tokenizer.no_padding()
            self.tokenizer.no_truncation()

    # ---- properties -----------------------------------------------------------------------
    architecture = property(lambda self: self._engine.architecture)
    is_decoder = property(lambda self: self._engine.is_decoder)
    is_seq2seq = property(lambda self: self._engine.is_seq2seq, doc="an encoder-decoder model (BART)")
    vocab_size = property(lambda self: self._engine.vocab_size)
    hidden_size = property(lambda self: self._engine.hidden_size)
    max_positions = property(lambda self: self._engine.max_positions)
    scheme = property(lambda self: self._engine.scheme)
    device = property(lambda self: self._engine.device, doc='"cpu" or "cuda:N"')
    backend = property(lambda self: self._engine.backend, doc='the kernels in use, e.g. "cpu (avx2)"')
    max_memory = property(lambda self: self._engine.max_memory, doc="bytes a load or call may take (0: available memory)")
    weight_memory = property(lambda self: self._engine.weight_memory, doc="estimated bytes of the loaded weights")
    strategy = property(lambda self: self._engine.strategy_summary,
                        doc="the per-shape strategy in use, one line per part ('' when none)")
    strategy_note = property(lambda self: self._engine.strategy_note,
                             doc="why a strategy table was ignored ('' when none was)")
    strategy_memory = property(lambda self: self._engine.strategy_memory,
                               doc="bytes of the weight-only weight copies the strategy table made")

    def call_memory(self, batch: int, tokens: int, max_new_tokens: int = 0) -> int:
        """Estimated working memory (bytes) of a forward (max_new_tokens=0) or generate call on
        [batch, tokens] ids: what is checked against max_memory before the call runs."""
        return self._engine.call_memory(batch, tokens, max_new_tokens)

    @property
    def threads(self) -> int:
        return self._engine.threads

    @threads.setter
    def threads(self, n: int) -> None:
        self._engine.threads = n

    # ---- running --------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None) -> np.ndarray:
        """Decoders: logits [B, T, vocab]; encoders: last hidden states [B, T, hidden]. Encoder-decoders:
        with decoder_input_ids [B, Td] (teacher forcing; pad on the right) the decoder's logits
        [B, Td, vocab] over the encoder's output for input_ids, without them the encoder's last hidden
        states."""
        if decoder_input_ids is not None:
            if not self.is_seq2seq:
                raise ValueError(f"decoder_input_ids need an encoder-decoder model; {self.architecture} is not one")
            return self._engine.forward_seq2seq(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        if decoder_attention_mask is not None:
            raise ValueError("decoder_attention_mask without decoder_input_ids")
        return self._engine.forward(input_ids, attention_mask)

    @property
    def config(self) -> dict:
        """The model's config.json as the model file records it."""
        if getattr(self, "_config", None) is None:
            import json

            from safetensors import safe_open

            file = self.path if os.path.isfile(self.path) else os.path.join(self.path, MODEL_FILE)
            with safe_open(file, "np") as f:
                self._config = json.loads((f.metadata() or {}).get("config", "{}"))
        return self._config

    def generation_defaults(self) -> dict:
        """Encoder-decoders: decoder_start_token_id, eos_token_id, forced_bos_token_id and
        forced_eos_token_id from the model's generation_config.json (next to the model file), else its
        config; what transformers' generate() uses by default (greedy, one beam)."""
        import json

        folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        gen = {}
        path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                gen = json.load(f)
        out = {}
        for key in ("decoder_start_token_id", "eos_token_id", "forced_bos_token_id", "forced_eos_token_id"):
            v = gen.get(key, self.config.get(key))
            if isinstance(v, list):  # several eos ids: each stops; only a single one can be forced
                v = v if key == "eos_token_id" else (v[0] if len(v) == 1 else None)
            out[key] = v
        return out

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer

    def encode_batch(self, texts: Sequence[str], max_length: Optional[int] = None):
        """Token ids and attention mask [B, T], right-padded, truncated to the model's positions."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or len(texts) == 0:
            raise ValueError("texts must be a non-empty list of strings")
        tok = self._need_tokenizer()
        limit = min(max_length or self.max_positions, self.max_positions)
        encs = [tok.encode(t).ids[:limit] for t in texts]
        width = max(1, max(len(e) for e in encs))
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        for i, e in enumerate(encs):
            ids[i, :len(e)] = e
            mask[i, :len(e)] = 1
        return ids, mask

    def embed(self, texts: Union[str, Sequence[str]], batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings of an encoder: mean over real tokens, then L2-normalized."""
        if self.is_decoder:
            raise ValueError(f"embed() needs an encoder; {self.architecture} is a decoder")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.encode_batch(texts[start:start + batch_size])
            hidden = self.forward(ids, mask)
            m = mask[..., None].astype(np.float32)
            pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        emb = np.concatenate(out)
        return emb[0] if single else emb

    def generate(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens: Optional[Iterable[int]] = None,
                 callback: Optional[Callable[[int], None]] = None, forced_bos_token_id: Optional[int] = None,
                 forced_eos_token_id: Optional[int] = None,
                 suppress_tokens: Optional[Iterable[int]] = None) -> Union[str, List[int]]:
        """Continue `prompt` (text, or a list of token ids). Returns text for text, ids for ids.
        Greedy when temperature <= 0. `callback(token_id)` is called for each new token as it is made;
        stop_tokens default to the tokenizer's end-of-text token where one is known; suppress_tokens are never
        chosen (transformers' suppress_tokens).

        Encoder-decoders (BART): the prompt is the encoder's input and the result the decoder's output
        (text without special tokens, or the new ids). As transformers' generate() with num_beams=1: the
        decoder starts from decoder_start_token_id, stops at eos_token_id, and forced_bos_token_id /
        forced_eos_token_id (from generation_config.json or the config; forced_eos replaces the last
        token max_new_tokens allows) apply; forced_bos_token_id / forced_eos_token_id given here replace
        the model's (-1: none)."""
        if not (self.is_decoder or self.is_seq2seq):
            raise ValueError(f"generate() needs a decoder; {self.architecture} is an encoder")
        as_text = isinstance(prompt, str)
        ids = self._need_tokenizer().encode(prompt).ids if as_text else list(prompt)
        if len(ids) == 0:
            raise ValueError("the prompt is empty")
        seq2seq = {}
        if self.is_seq2seq:
            d = self.generation_defaults()
            for key, given in (("forced_bos_token_id", forced_bos_token_id),
                               ("forced_eos_token_id", forced_eos_token_id)):
                v = d[key] if given is None else given
                seq2seq[key] = -1 if v is None else int(v)
            if d["decoder_start_token_id"] is not None:
                seq2seq["decoder_start_token_id"] = int(d["decoder_start_token_id"])
            if stop_tokens is None:
                eos = d["eos_token_id"]
                stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        elif forced_bos_token_id is not None or forced_eos_token_id is not None:
            raise ValueError("forced_bos_token_id / forced_eos_token_id apply to encoder-decoder models")
        stops = list(stop_tokens) if stop_tokens is not None else self._default_stops()
        new = self._engine.generate(np.asarray([ids], dtype=np.int64), None, max_new_tokens, temperature,
                                    top_k, top_p, seed, stops, callback, **seq2seq,
                                    suppress_tokens=list(suppress_tokens or []))[0]
        if as_text:
            return self.tokenizer.decode(new, skip_special_tokens=True) if self.is_seq2seq else self.tokenizer.decode(new)
        return list(new)

    def stream(self, prompt: Union[str, Sequence[int]], **kwargs) -> Iterator[str]:
        """Yield the text of each new token as generation proceeds (runs generate in a thread)."""
        import queue
        import threading

        tokens: "queue.Queue" = queue.Queue()
        done = object()
        errors = []

        def run():
            try:
                ids = self._need_tokenizer().encode(prompt).ids if isinstance(prompt, str) else prompt
                self.generate(list(ids), callback=tokens.put, **kwargs)
            except Exception as e:  # re-raised in the consumer
                errors.append(e)
            finally:
                tokens.put(done)

        threading.Thread(target=run, daemon=True).start()
        seen: List[int] = []
        text = ""
        while (tok := tokens.get()) is not done:
            seen.append(tok)
            full = self.tokenizer.decode(seen) if self.tokenizer else None
            if full is None:
                yield str(tok)
            else:
                yield full[len(text):]
                text = full
        if errors:
            raise errors[0]

    def _default_stops(self) -> List[int]:
        if self.tokenizer is None:
            return []
        stops = []
        for name in ("<|endoftext|>", "<|im_end|>", "</s>", "<|end_of_text|>", "<|eot_id|>"):
            tid = self.tokenizer.token_to_id(name)
            if tid is not None:
                stops.append(tid)
        return stops
