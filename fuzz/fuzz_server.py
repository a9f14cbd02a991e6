"""atheris target: finequant serve's request handling, through the real Starlette app (ASGI, in process).

The input picks a route and method (first byte) and is the request body (the rest: JSON seeds that the
fuzzer mutates, fuzz/corpus/fuzz_server). The app serves a tiny random Llama with a word-level
tokenizer and a ChatML template (16 positions, so every generation ends within milliseconds) and a
tiny BERT for /v1/embeddings. Every answer must be 200 with a JSON body (or an SSE stream ending in
[DONE]) or a 4xx with OpenAI's error object; a 5xx, an exception out of the app, a response that never
ends or a slot left busy afterwards is a finding.

    python fuzz/fuzz_server.py [libFuzzer flags] CORPUS...     (make fuzz runs it; docs/DESIGN.md, Reliability)
"""
import asyncio
import json
import os
import shutil
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["finequant.serve", "json"]):
    import finequant.serve as serve

ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"),
          ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/v1/completions"), ("POST", "/v1/nowhere")]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _models(root: str):
    """A tiny Llama (16 positions) and a tiny BERT, random weights, word-level tokenizers."""
    import torch
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "to"]
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}, "<|im_start|>": 11, "<|im_end|>": 12}
    llama = os.path.join(root, "llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                 eos_token_id=12, bos_token_id=11)).eval().save_pretrained(llama)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(os.path.join(llama, "tokenizer.json"))
    with open(os.path.join(llama, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}, f)
    bert = os.path.join(root, "bert")
    BertModel(BertConfig(vocab_size=13, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16), add_pooling_layer=False) \
        .eval().save_pretrained(bert)
    tok.save(os.path.join(bert, "tokenizer.json"))
    return llama, bert


ROOT = tempfile.mkdtemp(prefix="fq_fuzz_server_")
LLAMA, BERT = _models(ROOT)
SERVERS = {"llama": serve.Server(LLAMA, slots=2, threads=1, name="llama"),
           "bert": serve.Server(BERT, threads=1, name="bert")}
APPS = {name: serve.create_app(s) for name, s in SERVERS.items()}
LOOP = asyncio.new_event_loop()


async def _call(app, method: str, path: str, body: bytes):
    """One HTTP request through the ASGI app: (status, body bytes). The client stays connected until
    the response ends, then disconnects (as a client that read everything)."""
    done = asyncio.Event()
    sent = {"status": None, "body": b""}
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")
            if not message.get("more_body", False):
                done.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"fuzz")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=20)
    return sent["status"], sent["body"]


def _check(status, data: bytes, route):
    if status is None:
        raise AssertionError(f"{route}: no response")
    if status >= 500:
        raise AssertionError(f"{route}: HTTP {status}: {data[:300]!r}")
    if data.startswith(b"data: "):  # a stream: events, then [DONE]
        events = [e for e in data.split(b"\n\n") if e]
        if status != 200 or events[-1] != b"data: [DONE]":
            raise AssertionError(f"{route}: stream without [DONE]: {data[-200:]!r}")
        for e in events[:-1]:
            json.loads(e[len(b"data: "):])
        return
    answer = json.loads(data)
    if status != 200 and not isinstance(answer.get("error", {}).get("message"), str):
        raise AssertionError(f"{route}: HTTP {status} without an error message: {data[:300]!r}")


def TestOneInput(data: bytes):
    if not data:
        return
    method, path = ROUTES[data[0] % len(ROUTES)]
    model = "bert" if path == "/v1/embeddings" or data[0] & 0x80 else "llama"
    status, body = LOOP.run_until_complete(_call(APPS[model], method, path, data[1:]))
    _check(status, body, (method, path, model))
    scheduler = SERVERS["llama"].scheduler
    if scheduler.running or scheduler.waiting:  # a finished response leaves no slot busy
        for _ in range(200):
            if not (scheduler.running or scheduler.waiting):
                break
            LOOP.run_until_complete(asyncio.sleep(0.005))
        else:
            raise AssertionError(f"slots still busy after {method} {path}: {scheduler.running} running, "
                                 f"{scheduler.waiting} waiting")


if __name__ == "__main__":
    try:
        atheris.Setup(sys.argv, TestOneInput)
        atheris.Fuzz()
    finally:
        for s in SERVERS.values():
            s.close()
        shutil.rmtree(ROOT, ignore_errors=True)
