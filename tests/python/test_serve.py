"""finequant serve: the continuous-batching scheduler from Python and the OpenAI-compatible server.

Tiny random gpt2 / llama / bert folders with a word-level tokenizer (special tokens <|im_start|> and
<|im_end|>, a ChatML template); uvicorn runs the app in a thread on a free localhost port. Concurrent
requests must give exactly the tokens Engine.generate gives each alone; errors are 4xx JSON; a client
that disconnects frees its slot; the official openai client works.
"""
import http.client
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

starlette = pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
import finequant  # noqa: E402
from finequant import _core  # noqa: E402
from finequant.serve import ChatTemplate, Server, TextStream, create_app  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "to", "house", "big", "small", "red", "blue"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer(vocab_size):
    """Word-level: <unk>, WORDS, w16.., and the two ChatML specials as the last ids."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size - 2)})
    vocab.update({"<|im_start|>": vocab_size - 2, "<|im_end|>": vocab_size - 1})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return tok


def _with_tokenizer(src, dst, vocab_size):
    shutil.copytree(src, dst)
    _tokenizer(vocab_size).save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    return dst


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    out = {fam: _with_tokenizer(tiny_models[fam], root / fam, 64) for fam in ("gpt2", "llama")}
    # An encoder with a word-level tokenizer over its own vocab.txt.
    bert = root / "bert"
    shutil.copytree(tiny_models["bert"], bert)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {w: i for i, w in enumerate((bert / "vocab.txt").read_text().split())}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(bert / "tokenizer.json"))
    out["bert"] = bert
    # A wider GPT-2 with 8192 positions: generations long enough (8,000 tokens, ~25 s on a 2-core Zen 4) that a
    # client disconnects in the middle even on a loaded machine (2,000 tokens, ~1 s, once finished first).
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    big = root / "gpt2_long_src"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=256, n_layer=4, n_head=4, n_positions=8192)).eval() \
        .save_pretrained(big)
    out["long"] = _with_tokenizer(big, root / "long", 64)
    return out


class _Running:
    """uvicorn serving create_app(server) in a thread on a free port."""

    def __init__(self, server):
        self.server = server
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.uv.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def request(self, method, path, body=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        return resp.status, text

    def post(self, path, body=None, raw=None):
        status, text = self.request("POST", path, body, raw)
        return status, json.loads(text) if text and not text.startswith("data:") else text

    def stop(self):
        self.uv.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def gpt2(folders):
    running = _Running(Server(str(folders["gpt2"]), slots=3, name="tiny-gpt2"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def llama(folders):
    running = _Running(Server(str(folders["llama"]), slots=2, name="tiny-llama"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def bert(folders):
    running = _Running(Server(str(folders["bert"]), name="tiny-bert"))
    yield running
    running.stop()


def _alone(server, ids, max_tokens, temperature=0.0, top_p=1.0, seed=0):
    """Engine.generate on one request, as the server would run it."""
    return server.engine.generate(list(ids), max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed, stop_tokens=server.stop_tokens)


def _text(server, ids):
    return server.tokenizer.decode(ids, skip_special_tokens=True)


def _sse(text):
    """The JSON events of a server-sent-event stream and whether it ended with [DONE]."""
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    done = events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done


# ---- the scheduler binding ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scheduler_matches_generate_alone(folders, family):
    eng = finequant.Engine(str(folders[family]))
    sched = _core._Scheduler(eng._engine, slots=3, max_length=0, cache_length=36)  # compacts (32 positions)
    rng = np.random.default_rng(0)
    requests = []
    for i in range(7):
        prompt = [int(t) for t in rng.integers(0, 64, size=int(rng.integers(1, 20)))]
        kw = dict(max_new_tokens=int(rng.integers(3, 30)), temperature=0.8 * (i % 2), top_p=0.9, seed=i)
        requests.append((prompt, kw))
    got, ids = {}, []
    for i, (prompt, kw) in enumerate(requests):
        ids.append(sched.submit(prompt, kw["max_new_tokens"], kw["temperature"], 0, kw["top_p"], kw["seed"], []))
        if i % 2:
            sched.step()
    sched.run_until_idle()
    finished = {}
    for rid, token, finish, error in sched.poll():
        assert error == ""
        if token >= 0:
            got.setdefault(rid, []).append(token)
        if finish:
            finished[rid] = finish
    assert sched.compactions > 0 and sched.running == 0 and sched.waiting == 0
    for rid, (prompt, kw) in zip(ids, requests):
        ref = eng.generate(prompt, stop_tokens=[], **kw)
        assert got.get(rid, []) == ref
        assert finished[rid] == "length"
    with pytest.raises(ValueError, match="outside"):
        sched.submit([64], 4, 0.0, 0, 1.0, 0, [])
    with pytest.raises(ValueError, match="max_length"):
        sched.submit([1] * 33, 4, 0.0, 0, 1.0, 0, [])
    with pytest.raises(NotImplementedError, match="decoder"):
        _core._Scheduler(finequant.Engine(str(folders["bert"]))._engine)


def test_scheduler_sliding_window_matches_generate(tmp_path):
    # Mistral with a window of 6: rows whose keys sit at other slots (gaps, compaction) must still see
    # exactly the keys of their last 6 positions.
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from finequant.modelfile import quantize_folder
    from finequant.schemes import parse_scheme

    torch.manual_seed(4)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40, sliding_window=6)
    MistralForCausalLM(cfg).eval().save_pretrained(tmp_path / "hf")
    try:
        quantize_folder(str(tmp_path / "hf"), str(tmp_path / "fp32"), parse_scheme("fp32"))
    except NotImplementedError as e:
        pytest.skip(f"sliding windows unsupported here: {e}")
    eng = finequant.Engine(str(tmp_path / "fp32"))
    sched = _core._Scheduler(eng._engine, slots=3, max_length=0, cache_length=44)
    rng = np.random.default_rng(5)
    cases = [([int(t) for t in rng.integers(0, 64, size=n)], m) for n, m in ((9, 20), (3, 30), (14, 12), (5, 25))]
    ids = []
    for prompt, m in cases:
        ids.append(sched.submit(prompt, m, 0.0, 0, 1.0, 0, []))
        sched.step()
        sched.step()
    sched.run_until_idle()
    got = {}
    for rid, token, _, _ in sched.poll():
        if token >= 0:
            got.setdefault(rid, []).append(token)
    assert sched.compactions > 0
    for rid, (prompt, m) in zip(ids, cases):
        assert got[rid] == eng.generate(prompt, max_new_tokens=m, stop_tokens=[])


def test_scheduler_step_releases_the_gil(folders):
    eng = finequant.Engine(str(folders["long"]), threads=1)
    sched = _core._Scheduler(eng._engine, slots=1, max_length=512)
    sched.submit([1, 2, 3], 400, 0.0, 0, 1.0, 0, [])
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    start = time.time()
    sched.run_until_idle()
    elapsed = time.time() - start
    stop.set()
    t.join()
    assert elapsed > 0.05 and len(ticks) > 10  # the counting thread ran while the engine computed


# ---- text -----------------------------------------------------------------------------------------

class _Chars:
    """A tokenizer stand-in: token i is the string pieces[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_text_stream_holds_back_stop_prefixes_and_trims():
    tok = _Chars(["Hello", " wor", "ld", " EN", "D here", "\ufffd"])
    s = TextStream(tok, ["END"])
    assert s.add(0) == ("Hello", False)
    assert s.add(1) == (" wor", False)
    assert s.add(2) == ("ld", False)
    assert s.add(3) == (" ", False)  # "EN" may become "END": held back
    assert s.add(4) == ("", True)    # the stop string and what follows are dropped
    assert s.text == "Hello world "
    s = TextStream(tok, ["xyz"])
    assert s.add(0) == ("Hello", False)
    assert s.add(5) == ("", False)  # half a character: wait
    assert s.finish() == "\ufffd"


def test_chat_template_renders_as_transformers(folders):
    transformers = pytest.importorskip("transformers")
    import os

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folders["gpt2"] / "tokenizer.json"))
    ours = ChatTemplate(str(folders["gpt2"])).render(messages)
    assert ours == tok.apply_chat_template(messages, chat_template=CHATML, tokenize=False, add_generation_prompt=True)
    smol = os.path.expanduser("~/.cache/finequant/models/SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(smol, "chat_template.jinja")):  # the shipped model's template, when present
        template = open(os.path.join(smol, "chat_template.jinja")).read()
        for msgs in (messages, messages[1:]):
            ref = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
            assert ChatTemplate(smol).render(msgs) == ref


# ---- endpoints ------------------------------------------------------------------------------------

def test_models_and_health(gpt2):
    status, body = gpt2.request("GET", "/v1/models")
    assert status == 200
    data = json.loads(body)["data"]
    assert [m["id"] for m in data] == ["tiny-gpt2"] and data[0]["object"] == "model"
    status, body = gpt2.request("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


@pytest.mark.parametrize("fixture", ["gpt2", "llama"])
def test_completion_equals_generate(fixture, request):
    running = request.getfixturevalue(fixture)
    server = running.server
    prompt = "the cat sat on the mat"
    status, body = running.post("/v1/completions", {"model": server.name, "prompt": prompt, "max_tokens": 12,
                                                     "temperature": 0})
    assert status == 200, body
    ids = server.tokenizer.encode(prompt).ids
    ref = _alone(server, ids, 12)
    choice = body["choices"][0]
    assert choice["text"] == _text(server, ref)
    assert choice["finish_reason"] == ("stop" if ref[-1] in server.stop_tokens else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref),
                             "total_tokens": len(ids) + len(ref)}
    assert body["object"] == "text_completion" and body["model"] == server.name


def test_concurrent_requests_equal_serial_generate(gpt2):
    server = gpt2.server
    rng = np.random.default_rng(1)
    cases = []
    for i in range(8):  # more requests than the 3 slots: some wait, all join between steps
        ids = [int(t) for t in rng.integers(1, 62, size=int(rng.integers(2, 12)))]
        cases.append(dict(ids=ids, max_tokens=int(rng.integers(4, 18)), temperature=0.9 * (i % 2), seed=100 + i))

    def run(c):
        return gpt2.post("/v1/completions", {"model": server.name, "prompt": c["ids"], "max_tokens": c["max_tokens"],
                                             "temperature": c["temperature"], "seed": c["seed"]})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, cases))
    for c, (status, body) in zip(cases, results):
        assert status == 200, body
        ref = _alone(server, c["ids"], c["max_tokens"], c["temperature"], seed=c["seed"])
        assert body["choices"][0]["text"] == _text(server, ref)
        assert body["usage"]["completion_tokens"] == len(ref)


def test_streaming_completion_and_chat(gpt2):
    server = gpt2.server
    req = {"model": server.name, "prompt": "a big red dog", "max_tokens": 10, "temperature": 0}
    _, plain = gpt2.post("/v1/completions", req)
    status, text = gpt2.request("POST", "/v1/completions", {**req, "stream": True,
                                                            "stream_options": {"include_usage": True}})
    assert status == 200
    events, done = _sse(text)
    assert done
    assert "".join(c["text"] for e in events for c in e["choices"]) == plain["choices"][0]["text"]
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == \
        [plain["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]

    chat = {"model": server.name, "messages": [{"role": "user", "content": "the dog ran"}], "max_tokens": 8,
            "temperature": 0}
    status, body = gpt2.post("/v1/chat/completions", chat)
    assert status == 200, body
    ids = server.tokenizer.encode("<|im_start|>user\nthe dog ran<|im_end|>\n<|im_start|>assistant\n",
                                  add_special_tokens=False).ids
    ref = _alone(server, ids, 8)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": _text(server, ref)}
    assert body["usage"]["prompt_tokens"] == len(ids) and body["object"] == "chat.completion"
    status, text = gpt2.request("POST", "/v1/chat/completions", {**chat, "stream": True})
    events, done = _sse(text)
    assert done and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "".join(c["delta"].get("content", "") for e in events for c in e["choices"]) == _text(server, ref)


def test_stop_strings_trim_the_text(gpt2):
    server = gpt2.server
    ids = [3, 4, 5, 6]
    ref_text = _text(server, _alone(server, ids, 16))
    words = ref_text.split()
    assert len(words) >= 4, ref_text
    stop = words[2]
    expected = ref_text[:ref_text.find(stop)]
    req = {"model": server.name, "prompt": ids, "max_tokens": 16, "temperature": 0, "stop": [stop, "never"]}
    status, body = gpt2.post("/v1/completions", req)
    assert status == 200
    assert body["choices"][0]["text"] == expected and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 16
    _, text = gpt2.request("POST", "/v1/completions", {**req, "stream": True})
    events, done = _sse(text)
    assert done and "".join(c["text"] for e in events for c in e["choices"]) == expected
    assert gpt2.server.scheduler.running == 0 or _wait(lambda: gpt2.server.scheduler.running == 0)


def _wait(cond, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("path,body,raw,status,code", [
    ("/v1/completions", None, b"{not json", 400, "invalid_json"),
    ("/v1/completions", None, b"[1, 2]", 400, "invalid_json"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "the"}, None, 404, "model_not_found"),
    ("/v1/completions", {"prompt": "the"}, None, 400, "missing_required_parameter"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": "the", "max_tokens": "ten"}, None, 400, "invalid_type"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": "the", "max_tokens": True}, None, 400, "invalid_type"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": "the", "temperature": 5}, None, 400, "invalid_value"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": "the", "max_tokens": 0}, None, 400, "invalid_value"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": 7}, None, 400, "invalid_type"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": ["the", "a"]}, None, 400, "unsupported_value"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": "the", "n": 2}, None, 400, "unsupported_value"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": "the", "stop": 3}, None, 400, "invalid_type"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": "the", "logprobs": 2}, None, 400, "unsupported_parameter"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": "the " * 30, "max_tokens": 8}, None, 400,
     "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": [1, 2, 99]}, None, 400, None),
    # fuzz_server findings: ids past int64 and negative ids (500 before)
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": [1, 2, 3 * 10**26]}, None, 400, None),
    ("/v1/completions", {"model": "tiny-gpt2", "prompt": [-1]}, None, 400, None),
    ("/v1/completions", None, b'{"model": "\\ud800"}', 400, "invalid_json"),
    ("/v1/completions", None, b'{"model": "tiny-gpt2", "prompt": "the \\udfff"}', 400, "invalid_json"),
    ("/v1/chat/completions", {"model": "tiny-gpt2", "messages": []}, None, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": "tiny-gpt2", "messages": [{"role": "user", "content": 3}]}, None, 400,
     "invalid_type"),
    ("/v1/embeddings", {"model": "tiny-gpt2", "input": "the"}, None, 400, "unsupported_model"),
    ("/v1/nowhere", {}, None, 404, None),
])
def test_bad_requests_get_openai_errors(gpt2, path, body, raw, status, code):
    got, answer = gpt2.post(path, body, raw)
    assert got == status, answer
    err = answer["error"]
    assert isinstance(err["message"], str) and err["message"]
    if code:
        assert err["code"] == code, err
    # the server goes on serving
    ok, _ = gpt2.post("/v1/completions", {"model": "tiny-gpt2", "prompt": "the", "max_tokens": 2})
    assert ok == 200


def test_top_k_past_the_vocabulary_keeps_every_token(gpt2):
    """fuzz_server finding: top_k past the C++ int was a 500; any k >= the vocabulary is no truncation."""
    body = {"model": "tiny-gpt2", "prompt": [1, 2, 3], "max_tokens": 6, "temperature": 1.0, "seed": 5}
    answers = [gpt2.post("/v1/completions", {**body, "top_k": k}) for k in (0, 64, 10**30)]
    assert [status for status, _ in answers] == [200] * 3, answers
    assert len({a["choices"][0]["text"] for _, a in answers}) == 1, answers


def test_wrong_method_and_encoder_routes(gpt2, bert):
    status, body = gpt2.request("GET", "/v1/completions")
    assert status == 405 and "error" in json.loads(body)
    status, body = bert.post("/v1/completions", {"model": "tiny-bert", "prompt": "the"})
    assert status == 400 and body["error"]["code"] == "unsupported_model"


def test_embeddings_are_mean_pooled_and_normalized(bert):
    server = bert.server
    texts = ["the cat sat", "a dog ran to the house"]
    status, body = bert.post("/v1/embeddings", {"model": "tiny-bert", "input": texts})
    assert status == 200, body
    got = np.array([d["embedding"] for d in body["data"]])
    np.testing.assert_allclose(got, server.engine.embed(texts), atol=1e-6)
    assert body["usage"]["prompt_tokens"] == sum(len(server.tokenizer.encode(t).ids) for t in texts)
    status, body = bert.post("/v1/embeddings", {"model": "tiny-bert", "input": [5, 6, 7], "encoding_format": "base64"})
    import base64

    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (32,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    status, body = bert.post("/v1/embeddings", {"model": "tiny-bert", "input": [list(range(5, 45))]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_disconnect_cancels_and_frees_the_slot(folders):
    running = _Running(Server(str(folders["long"]), slots=1, name="long", threads=1))
    try:
        sched = running.server.scheduler
        for stream in (True, False):
            sock = socket.create_connection(("127.0.0.1", running.port))
            body = json.dumps({"model": "long", "prompt": [1, 2, 3], "max_tokens": 8000, "temperature": 0,
                               "stream": stream}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert _wait(lambda: sched.running == 1)
            if stream:
                assert sock.recv(100).startswith(b"HTTP/1.1 200")  # the stream started
            sock.close()
            assert _wait(lambda: sched.running == 0, 5), "the slot was not freed"
            # The server counts the cancellation when it polls the step's events, just after the step that freed
            # the slot: wait for it too (read at once, it missed the count once in `make test`).
            assert _wait(lambda: running.server.cancelled >= (1 if stream else 2), 5), running.server.cancelled
        # The freed slot serves the next request with generate's tokens (greedy: at the default temperature
        # 1 a sampled end-of-text token made this flaky, 2 of 3 tokens once in CI).
        status, body = running.post("/v1/completions", {"model": "long", "prompt": [1, 2], "max_tokens": 3,
                                                        "temperature": 0})
        ref = _alone(running.server, [1, 2], 3)
        assert status == 200 and body["usage"]["completion_tokens"] == len(ref) == 3, body
        assert body["choices"][0]["text"] == _text(running.server, ref), body
    finally:
        running.stop()


def test_openai_client(gpt2, bert):
    openai = pytest.importorskip("openai")
    server = gpt2.server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gpt2.port}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-gpt2"]
    out = client.completions.create(model="tiny-gpt2", prompt="the small blue house", max_tokens=9, temperature=0)
    ids = server.tokenizer.encode("the small blue house").ids
    ref = _alone(server, ids, 9)
    assert out.choices[0].text == _text(server, ref) and out.usage.completion_tokens == len(ref)
    messages = [{"role": "user", "content": "the dog ran"}]
    chat = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=6, temperature=0, seed=3)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-gpt2", messages=messages, max_tokens=6, temperature=0, seed=3, stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="the", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny-gpt2", prompt="the " * 40, max_tokens=2)
    emb = openai.OpenAI(base_url=f"http://127.0.0.1:{bert.port}/v1", api_key="unused").embeddings.create(
        model="tiny-bert", input=["the cat sat"])
    np.testing.assert_allclose(emb.data[0].embedding, bert.server.engine.embed("the cat sat"), atol=1e-5)


def test_cli_serve_refuses_a_missing_model(tmp_path, capsys):
    from finequant.cli import main

    assert main(["serve", str(tmp_path / "nowhere"), "--port", "1"]) == 2
    assert "finequant: error:" in capsys.readouterr().err
