"""`finequant serve`: an OpenAI-compatible HTTP server (docs/DESIGN.md section 11).

A Starlette app served by uvicorn. Decoders: /v1/completions and /v1/chat/completions (the model's chat
template) run through the C++ continuous-batching scheduler (finequant._core._Scheduler): one
background thread steps it (the GIL released while it computes) and hands each request's tokens to
its asyncio queue; requests join the running batch between decode steps. Encoders: /v1/embeddings
(mean-pooled, L2-normalized, as Engine.embed). /v1/models and /health for everyone. Errors are
OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}) with a 4xx status; a client that
disconnects cancels its request, which frees its slot.

    finequant serve MODEL [--host 127.0.0.1] [--port 8000] [--slots 8] [--threads N]
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _core
from .engine import Engine

MAX_STOP_STRINGS = 4
MAX_EMBEDDING_INPUTS = 2048


class APIError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request validation --------------------------------------------------------------------------

def _get(body: dict, key: str, kinds, default=None, check=None, what: str = ""):
    """body[key] (default when absent or null), which must be one of `kinds` (bool is not a number)."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    numeric = any(k in (int, float) for k in kinds)
    if not isinstance(value, kinds) or (numeric and isinstance(value, bool) and bool not in kinds):
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                             list: "an array", dict: "an object"}[k] for k in kinds)
        raise APIError(400, f"'{key}' must be {names}, got {json.dumps(value)[:50]}", param=key, code="invalid_type")
    if check is not None and not check(value):
        raise APIError(400, f"'{key}' {what}, got {json.dumps(value)[:50]}", param=key, code="invalid_value")
    return value


def _stop_strings(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or an array of them", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    return stop


class Sampling:
    """The sampling fields of a completion request, checked."""

    def __init__(self, body: dict, default_max_tokens: Optional[int], chat: bool):
        self.temperature = float(_get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2,
                                      "must be in [0, 2]"))
        self.top_p = float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]"))
        # An extension, as vLLM's; any k >= the vocabulary keeps every token (clamped to fit the C++ int).
        self.top_k = min(_get(body, "top_k", int, 0, lambda v: v >= 0, "must be >= 0"), 2**31 - 1)
        seed = _get(body, "seed", int, None, lambda v: -2**63 <= v < 2**64, "must fit in 64 bits")
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed % 2**64
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        self.max_tokens = _get(body, key, int, default_max_tokens, lambda v: v >= 1, "must be >= 1")
        self.max_tokens_key = key
        n = _get(body, "n", int, 1)
        if n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        self.stop = _stop_strings(body)
        self.ignore_eos = _get(body, "ignore_eos", bool, False)  # vLLM's extension: exact lengths for benchmarks
        self.stream = _get(body, "stream", bool, False)
        options = _get(body, "stream_options", dict, {})
        self.include_usage = bool(options.get("include_usage")) and self.stream
        for key, neutral in (("logprobs", (None, False)), ("top_logprobs", (None, 0)), ("echo", (None, False)),
                             ("best_of", (None, 1)), ("suffix", (None, "")), ("logit_bias", (None, {})),
                             ("tools", (None, [])), ("functions", (None, [])), ("presence_penalty", (None, 0)),
                             ("frequency_penalty", (None, 0))):
            if body.get(key) not in neutral:
                raise APIError(400, f"'{key}' is not supported by finequant serve", param=key,
                               code="unsupported_parameter")


# ---- text out of tokens --------------------------------------------------------------------------

class TextStream:
    """Incremental detokenization with stop strings: add(token) returns the text that is safe to send
    (never half a UTF-8 character, never a possible start of a stop string) and whether a stop string
    was met; the text never contains the stop string or anything after it."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.ids: List[int] = []
        self.sent = 0  # characters of the text already returned
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> Tuple[str, bool]:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self._take(len(self.text)), True
        self.text = text
        end = len(text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            end = len(text.rstrip("\ufffd"))
        for s in self.stops:  # hold back a suffix that may grow into a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return self._take(end), False

    def finish(self) -> str:
        """The rest of the text at the end of generation."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out


# ---- chat templates -------------------------------------------------------------------------------

class ChatTemplate:
    """The model's chat template (tokenizer_config.json's chat_template, or chat_template.jinja), rendered
    with Jinja2 the way transformers' apply_chat_template does (sandboxed, trim_blocks, lstrip_blocks,
    loopcontrols, tojson, raise_exception, strftime_now, the special tokens as variables)."""

    def __init__(self, folder: str):
        self.source, self.variables = None, {}
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            v = config.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                self.variables[key] = v
        if template:
            self.source = template
            self._compiled = self._compile(template)

    @staticmethod
    def _compile(source: str):
        from datetime import datetime

        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise APIError(400, f"the chat template refused the messages: {message}", param="messages")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(source)

    def render(self, messages: List[dict]) -> str:
        if self.source is None:
            raise APIError(400, "this model has no chat template (tokenizer_config.json chat_template or "
                                "chat_template.jinja): use /v1/completions", param="messages")
        return self._compiled.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                     **self.variables)


def _messages(body: dict) -> List[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or text parts",
                           param=f"messages[{i}].content", code="invalid_type")
        out.append({**m, "content": content})
    return out


# ---- the scheduler's driver -----------------------------------------------------------------------

class _Pending:
    """A request's end of the driver: its events, delivered on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()


class Server:
    """The model, its scheduler (decoders) and the thread that drives it."""

    def __init__(self, model: str, slots: int = 8, threads: Optional[int] = None, device: str = "cpu",
                 max_length: Optional[int] = None, cache_length: int = 0, name: Optional[str] = None,
                 float_precision: str = "fp32"):
        self.engine = Engine(model, threads=threads, device=device, float_precision=float_precision)
        self.name = name or os.path.basename(os.path.normpath(model))
        self.created = int(time.time())
        self.tokenizer = self.engine.tokenizer
        folder = self.engine.path if os.path.isdir(self.engine.path) else os.path.dirname(self.engine.path)
        self.chat = ChatTemplate(folder)
        self.scheduler = None
        self.stop_tokens: List[int] = []
        if self.engine.is_decoder:
            limit = min(max_length or self.engine.max_positions, self.engine.max_positions)
            self.scheduler = _core._Scheduler(self.engine._engine, slots, limit, cache_length)
            self.stop_tokens = self._stop_tokens()
        elif self.engine.is_seq2seq:
            raise ValueError(f"{model}: finequant serve runs decoders and encoders; {self.engine.architecture} "
                             "is an encoder-decoder")
        self._lock = threading.Lock()  # submit + registration vs the driver's dispatch
        self._pending: Dict[int, _Pending] = {}
        self._closed = threading.Event()
        self.cancelled = 0  # requests cancelled (stop strings, disconnected clients)
        self._thread = None
        if self.scheduler is not None:
            self._thread = threading.Thread(target=self._drive, name="finequant-scheduler", daemon=True)
            self._thread.start()

    def _stop_tokens(self) -> List[int]:
        stops = set(self.engine._default_stops())
        eos = self.engine.generation_defaults().get("eos_token_id")
        for t in ([eos] if isinstance(eos, int) else (eos or [])):
            stops.add(int(t))
        return sorted(t for t in stops if 0 <= t < self.engine.vocab_size)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def _drive(self) -> None:
        s = self.scheduler
        while not self._closed.is_set():
            if not s.wait_for_work(0.05):
                continue
            s.step()  # a failing step ends its requests with an 'error' event; it does not raise
            events = s.poll()
            with self._lock:
                for request, token, finish, error in events:
                    p = self._pending.get(request)
                    if p is None:
                        continue
                    if finish == "cancelled":
                        self.cancelled += 1
                    if finish:
                        del self._pending[request]
                    try:
                        p.loop.call_soon_threadsafe(p.queue.put_nowait, (token, finish, error))
                    except RuntimeError:  # its event loop is gone
                        pass

    # ---- generation ----------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> List[int]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer.json: send token ids", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def submit(self, prompt: List[int], sampling: Sampling) -> Tuple[int, _Pending]:
        max_length = self.scheduler.max_length
        if len(prompt) == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompt) + sampling.max_tokens > max_length:
            raise APIError(400, f"this model's maximum context length is {max_length} tokens; the prompt has "
                                f"{len(prompt)} and {sampling.max_tokens_key} asks for {sampling.max_tokens}",
                           param=sampling.max_tokens_key if len(prompt) < max_length else "prompt",
                           code="context_length_exceeded")
        vocab = self.engine.vocab_size
        if not all(0 <= t < vocab for t in prompt):  # checked here too: ids past int64 do not reach C++
            raise APIError(400, f"the prompt has token ids outside [0, {vocab})", param="prompt")
        pending = _Pending(asyncio.get_running_loop())
        with self._lock:
            try:
                request = self.scheduler.submit(prompt, sampling.max_tokens, sampling.temperature, sampling.top_k,
                                                sampling.top_p, sampling.seed,
                                                [] if sampling.ignore_eos else self.stop_tokens)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
            self._pending[request] = pending
        return request, pending

    def cancel(self, request: int) -> None:
        self.scheduler.cancel(request)

    async def tokens(self, prompt: List[int], sampling: Sampling):
        """Yields (token, finish reason or '') as the scheduler makes them; cancels the request when the
        consumer stops early (a stop string, a disconnected client)."""
        request, pending = self.submit(prompt, sampling)
        finished = False
        try:
            while True:
                token, finish, error = await pending.queue.get()
                if finish == "error":
                    finished = True
                    raise APIError(500, f"generation failed: {error}", type="server_error")
                if finish:
                    finished = True
                if token >= 0 or finish:
                    yield token, finish
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(request)


# ---- the HTTP app ---------------------------------------------------------------------------------

def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(server: Server):
    """The Starlette app over `server` (closing the app's lifespan closes the server)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error_response(e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:  # "\ud800" escapes decode to lone surrogates, which no tokenizer or UTF-8 answer can take
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise APIError(400, "the request body has an unpaired UTF-16 surrogate (\\ud800-\\udfff)",
                           code="invalid_json") from None
        model = body.get("model")
        if model is not None and model != server.name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{server.name}'",
                           param="model", code="model_not_found")
        if model is None:
            raise APIError(400, "'model' is required", param="model", code="missing_required_parameter")
        return body

    def need_decoder(route: str):
        if server.scheduler is None:
            raise APIError(400, f"{route} needs a decoder; '{server.name}' is an encoder ({server.engine.architecture}):"
                                " use /v1/embeddings", param="model", code="unsupported_model")

    async def until_disconnected(request: Request):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def complete(request: Request, prompt: List[int], sampling: Sampling, chat: bool):
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        text = TextStream(server.tokenizer, sampling.stop) if server.tokenizer else None
        if text is None:
            raise APIError(400, "this model has no tokenizer.json: it cannot return text", param="model")

        def choice(piece: str, finish: Optional[str], first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": piece} if first else ({"content": piece} if piece else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}

        def chunk(choices: list, usage: Optional[dict] = None) -> str:
            body = {"id": cid, "object": obj + (".chunk" if chat else ""), "created": created, "model": server.name,
                    "choices": choices}
            if usage is not None or sampling.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        # The request is submitted (and its first token awaited) before the response starts, so that a
        # refusal is a 4xx answer, not a broken stream.
        tokens = server.tokens(prompt, sampling)
        first = await tokens.__anext__()

        async def produce():
            """(text piece, finish reason or None, tokens so far) as tokens arrive."""
            made = 0
            item = first
            while True:
                token, finish = item
                piece = ""
                if token >= 0:
                    made += 1
                    piece, stopped = text.add(token)
                    if stopped:
                        await tokens.aclose()  # cancels the request: its slot frees
                        yield piece, "stop", made
                        return
                if finish:
                    yield piece + text.finish(), "stop" if finish == "stop" else "length", made
                    return
                if piece:
                    yield piece, None, made
                item = await tokens.__anext__()

        if sampling.stream:
            async def events():
                try:
                    if chat:
                        yield chunk([choice("", None, first=True)])
                    made = 0
                    async for piece, finish, made in produce():
                        if piece:
                            yield chunk([choice(piece, None)])
                        if finish:
                            yield chunk([choice("", finish)])
                    if sampling.include_usage:
                        yield chunk([], _usage(len(prompt), made))
                    yield "data: [DONE]\n\n"
                finally:
                    await tokens.aclose()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect():
            pieces, finish, made = [], None, 0
            async for piece, finish, made in produce():
                pieces.append(piece)
            return "".join(pieces), finish, made

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client left: cancel its request (frees the slot)
            work.cancel()
            await asyncio.wait({work})
            await tokens.aclose()
            return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
        content, finish, made = work.result()
        if chat:
            c = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                 "finish_reason": finish}
        else:
            c = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
        return JSONResponse({"id": cid, "object": obj, "created": created, "model": server.name, "choices": [c],
                             "usage": _usage(len(prompt), made)})

    async def completions(request: Request):
        body = await read_body(request)
        need_decoder("/v1/completions")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = server.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise APIError(400, f"one prompt per request (got {len(prompt)}): send concurrent requests instead, "
                                "they are batched", param="prompt", code="unsupported_value")
        else:
            raise APIError(400, "'prompt' must be a non-empty string or array of token ids", param="prompt",
                           code="invalid_type")
        sampling = Sampling(body, 16, chat=False)  # OpenAI's default max_tokens for completions
        return await complete(request, ids, sampling, chat=False)

    async def chat_completions(request: Request):
        body = await read_body(request)
        need_decoder("/v1/chat/completions")
        text = server.chat.render(_messages(body))
        ids = server.encode(text, special=False)  # the template writes the special tokens itself
        sampling = Sampling(body, None, chat=True)
        if sampling.max_tokens is None:  # OpenAI: up to the context length
            sampling.max_tokens = max(1, server.scheduler.max_length - len(ids))
        return await complete(request, ids, sampling, chat=True)

    async def embeddings(request: Request):
        body = await read_body(request)
        if server.engine.is_decoder:
            raise APIError(400, f"/v1/embeddings needs an encoder; '{server.name}' is a decoder "
                                f"({server.engine.architecture})", param="model", code="unsupported_model")
        fmt = _get(body, "encoding_format", str, "float", lambda v: v in ("float", "base64"),
                   "must be 'float' or 'base64'")
        raw = body.get("input")
        if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise APIError(400, "'input' must be a string, an array of strings, or token ids", param="input",
                           code="invalid_type")
        if len(raw) > MAX_EMBEDDING_INPUTS:
            raise APIError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(raw)}", param="input")
        seqs = []
        for i, x in enumerate(raw):
            if isinstance(x, str):
                ids = server.encode(x)
            elif isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                ids = list(x)
            else:
                raise APIError(400, f"input[{i}] must be a string or an array of token ids", param="input",
                               code="invalid_type")
            if not ids:
                raise APIError(400, f"input[{i}] is empty", param="input")
            if len(ids) > server.engine.max_positions:
                raise APIError(400, f"input[{i}] has {len(ids)} tokens; this model's maximum is "
                                    f"{server.engine.max_positions}", param="input", code="context_length_exceeded")
            if min(ids) < 0 or max(ids) >= server.engine.vocab_size:
                raise APIError(400, f"input[{i}] has token ids outside [0, {server.engine.vocab_size})", param="input")
            seqs.append(ids)
        vectors = await asyncio.get_running_loop().run_in_executor(None, _embed, server.engine, seqs)
        data = []
        for i, v in enumerate(vectors):
            if fmt == "base64":
                import base64

                emb = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            else:
                emb = [float(x) for x in v]
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(map(len, seqs))
        return JSONResponse({"object": "list", "data": data, "model": server.name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": server.name, "object": "model", "created": server.created, "owned_by": "finequant"}]})

    async def health(request: Request):
        status = {"status": "ok", "model": server.name}
        if server.scheduler is not None:
            status.update(running=server.scheduler.running, waiting=server.scheduler.waiting,
                          slots=server.scheduler.slots, cancelled=server.cancelled)
        return JSONResponse(status)

    def guarded(handler):
        async def run(request: Request):
            try:
                return await handler(request)
            except APIError as e:
                return error_response(e)
        return run

    async def http_error(request, exc: HTTPException):
        return error_response(APIError(exc.status_code, exc.detail or "error", code=None))

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    routes = [Route("/v1/completions", guarded(completions), methods=["POST"]),
              Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
              Route("/v1/embeddings", guarded(embeddings), methods=["POST"]),
              Route("/v1/models", guarded(models), methods=["GET"]),
              Route("/health", guarded(health), methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def _embed(engine: Engine, seqs: List[List[int]], batch: int = 32) -> np.ndarray:
    """Mean over real tokens of the last hidden states, L2-normalized (Engine.embed's pooling)."""
    out = []
    for start in range(0, len(seqs), batch):
        part = seqs[start:start + batch]
        width = max(map(len, part))
        ids = np.zeros((len(part), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, s in enumerate(part):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        hidden = engine.forward(ids, mask)
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, slots: int = 8, threads: Optional[int] = None,
          device: str = "cpu", max_length: Optional[int] = None, name: Optional[str] = None,
          float_precision: str = "fp32", log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn)."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError("finequant serve needs starlette and uvicorn: pip install 'finequant[serve]'") from None
    server = Server(model, slots=slots, threads=threads, device=device, max_length=max_length, name=name,
                    float_precision=float_precision)
    uvicorn.run(create_app(server), host=host, port=port, log_level=log_level)
