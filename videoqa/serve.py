"""`videoqa serve`: OpenAI's chat completions over HTTP (FastAPI, uvicorn), the model loaded once.

A request's messages become the family's template turn by turn (`Chat`): user content parts `text`, `image_url`,
`video_url` (or `input_video`), each a `file://` URL or a path under an `--allow` directory, or a `data:` URL. One
worker thread answers, one request at a time, from a bounded queue (429 when it is full); a conversation that goes
on from an earlier answer reuses that answer's `Chat` (its KV cache: only the new turn is prefilled), kept least
recently used. Errors are OpenAI's error object with a status code, never a traceback. (FastAPI is the optional
extra `videoqa[serve]`: the CLI imports this module only for `videoqa serve`.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import queue
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from videoqa.errors import Exit, VideoQAError

MEDIA_PARTS = {"image_url": "image", "video_url": "video", "input_video": "video"}
SAMPLING = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
            "top_p": "top_p", "seed": "seed"}


class Refused(Exception):
    """A request the server answers with an error object: (status, message, type, code)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    body: int = 64 << 20  # bytes of a request body
    media: int = 256 << 20  # bytes of one decoded data: URL
    queue: int = 8  # requests waiting for the worker
    seconds: float = 600.0  # a request's time limit
    conversations: int = 8  # KV caches of recent conversations kept


@dataclass
class Turn:
    media: list[str]  # the user turn's file references, in the order given
    text: str
    answer: str | None = None  # the assistant's reply after it (None: the turn to answer)


def turns_of(messages: Any) -> list[Turn]:
    """The messages as user turns, each with the assistant answer that followed it; the last one unanswered. A
    system message is refused (the families' templates are written without one)."""
    if not isinstance(messages, list) or not messages:
        raise Refused(400, "messages: a non-empty list of {role, content} objects is needed")
    turns: list[Turn] = []
    for n, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        expected = "user" if not turns or turns[-1].answer is not None else "assistant"
        if role != expected:
            raise Refused(400, f"messages[{n}]: a {expected} message is expected here, not {role!r}")
        if role == "user":
            turns.append(user_turn(message.get("content"), n))
        else:
            turns[-1].answer = text_of(message.get("content"), n)
    if turns[-1].answer is not None:
        raise Refused(400, "messages: the last message must be the user's")
    return turns


def text_of(content: Any, n: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise Refused(400, f"messages[{n}].content: text or a list of text parts is expected")


def user_turn(content: Any, n: int) -> Turn:
    """A user message's files and text; a part of another type is refused."""
    if isinstance(content, str):
        return Turn([], content)
    if not isinstance(content, list):
        raise Refused(400, f"messages[{n}].content: a string or a list of content parts is expected")
    media, text = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(str(part.get("text", "")))
        elif kind in MEDIA_PARTS:
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise Refused(400, f"messages[{n}]: a {kind} part needs a url")
            media.append(url)
        else:
            raise Refused(400, f"messages[{n}]: content part type {kind!r} is not one of text, image_url, "
                               "video_url, input_video")
    if not "".join(text).strip():
        raise Refused(400, f"messages[{n}]: the user message has no text")
    return Turn(media, " ".join(text))


class Files:
    """Where a request's media are: a file under an --allow directory (through `..` and symbolic links too), or
    a data: URL written once under the server's own directory (by its content's hash)."""

    def __init__(self, allow: list[Path], limit: int):
        self.allow = [Path(os.path.realpath(d)) for d in allow]
        self.limit = limit
        self.spool = Path(tempfile.mkdtemp(prefix="videoqa-serve-"))

    def path(self, url: str) -> Path:
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            raise Refused(400, f"{parsed.scheme}:// media are not fetched: give a file:// URL under an --allow "
                               "directory or a data: URL")
        if parsed.scheme == "data":
            return self.data(url)
        if parsed.scheme not in ("", "file"):
            raise Refused(400, f"media URL scheme {parsed.scheme!r}: file:// or data: is expected")
        return self.allowed(Path(unquote(parsed.path) if parsed.scheme == "file" else url))

    def allowed(self, path: Path) -> Path:
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(d) for d in self.allow):
            raise Refused(403, f"{path}: outside the directories the server may read (--allow)",
                          "permission_error")
        return real

    def data(self, url: str) -> Path:
        """A data: URL's bytes in a file named by their hash (the extension from its media type)."""
        head, _, payload = url.partition(",")
        if not head.endswith(";base64"):
            raise Refused(400, "data: URLs must be base64 (data:<type>;base64,...)")
        if len(payload) * 3 // 4 > self.limit:
            raise Refused(413, f"a data: URL of more than {self.limit} bytes", code="media_too_large")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(400, "a data: URL that is not valid base64") from None
        suffix = "." + head.removeprefix("data:").split(";")[0].partition("/")[2].split("+")[0]
        file = self.spool / (hashlib.sha256(raw).hexdigest()[:32] + (suffix if len(suffix) > 1 else ""))
        if not file.exists():
            file.write_bytes(raw)
        return file


@dataclass
class Job:
    """One request for the worker: what to answer and how, and where its pieces go."""

    turns: list[Turn]
    settings: dict
    framing: dict
    stream: bool
    out: queue.Queue = field(default_factory=queue.Queue)  # text pieces, then a final dict or a Refused
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float = 0.0


def conversation_key(turns: list[Turn], framing: dict) -> str:
    return hashlib.sha256(json.dumps([[t.media, t.text, t.answer] for t in turns] + [framing]).encode()).hexdigest()


class Worker:
    """The model's one thread: jobs from a bounded queue, one at a time; the Chats of recent conversations kept
    (least recently used first out) so a follow-up prefills only its new turn."""

    def __init__(self, model, files: Files, limits: Limits):
        self.model, self.files, self.limits = model, files, limits
        self.jobs: queue.Queue = queue.Queue(maxsize=limits.queue)
        self.chats: OrderedDict[str, Any] = OrderedDict()
        threading.Thread(target=self.run, daemon=True, name="videoqa-model").start()

    def submit(self, job: Job) -> None:
        job.deadline = time.monotonic() + self.limits.seconds
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Refused(429, "the server is busy: too many requests waiting", "rate_limit_error") from None

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                job.out.put(Refused(499, "the client went away"))
                continue
            try:
                self.answer(job)
            except Refused as e:
                job.out.put(e)
            except VideoQAError as e:  # out of memory: 503, the server goes on; a bad request: 400
                memory = e.code == Exit.MEMORY
                job.out.put(Refused(503 if memory else 400, str(e), "server_error" if memory else
                                    "invalid_request_error"))
            except Exception as e:  # noqa: BLE001 (the server keeps serving; the client gets the reason)
                from videoqa import memory

                status = 503 if memory.is_oom(e) else 500
                job.out.put(Refused(status, f"{type(e).__name__}: {e}", "server_error"))

    def chat_for(self, job: Job):
        """The conversation before the job's last turn: a kept Chat that ended there, or one rebuilt from the
        messages (earlier answers taken as given)."""
        key = conversation_key(job.turns[:-1], job.framing)
        chat = self.chats.pop(key, None)
        if chat is not None:
            return chat
        first, *rest = job.turns
        paths = [self.files.path(url) for url in first.media]
        if not paths:
            raise Refused(400, "the first user message needs an image_url or video_url part")
        chat = self.model.chat(paths, **job.framing)
        for turn in job.turns[:-1]:
            if turn is not first:
                for url in turn.media:
                    chat.add(self.files.path(url), **job.framing)
            chat.take(turn.text, self.model.tokenizer(turn.answer, add_special_tokens=False).input_ids)
        return chat

    def answer(self, job: Job) -> None:
        chat = self.chat_for(job)
        if len(job.turns) > 1:
            for url in job.turns[-1].media:
                chat.add(self.files.path(url), **job.framing)
        tokens = chat.tokens(job.turns[-1].text, **job.settings)
        from videoqa.output import texts, until_stop

        stop = chat.settings.changed(**{k: v for k, v in job.settings.items() if k == "stop"}).stop
        try:
            for piece in until_stop(texts(tokens, self.model.tokenizer), stop):
                if job.cancelled.is_set():  # the answer is dropped; whoever still waits gets an end
                    raise Refused(499, "the client went away")
                if time.monotonic() > job.deadline:
                    raise Refused(504, f"the answer ran past the time limit of {self.limits.seconds:g} s",
                                  "server_error")
                job.out.put(piece)
        finally:
            tokens.close()
        answer = chat.answers[-1]
        self.keep(conversation_key([*job.turns[:-1], Turn(job.turns[-1].media, job.turns[-1].text, answer.text)],
                                   job.framing), chat)
        job.out.put(answer)

    def keep(self, key: str, chat) -> None:
        self.chats[key] = chat
        while len(self.chats) > self.limits.conversations:
            self.chats.popitem(last=False)


def settings_of(body: dict) -> tuple[dict, dict]:
    """The request's sampling settings (OpenAI's names read as videoqa's, `stop` a string or a list) and its
    framing: videoqa's own `frames` and `fps`, as extra body fields."""
    settings = {ours: body[theirs] for theirs, ours in SAMPLING.items() if body.get(theirs) is not None}
    if body.get("logprobs"):
        settings["logprobs"] = int(body.get("top_logprobs") or 0)
    stop = body.get("stop")
    if stop is not None:
        settings["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    framing = {name: body[name] for name in ("frames", "fps") if body.get(name) is not None}
    return settings, framing


def completion(model, answer, created: int, ident: str) -> dict:
    """OpenAI's chat.completion object for an Answer: `length` when it ran out of tokens, `usage` from what the
    turn prefilled (a follow-up's new tokens alone) and generated."""
    finish = "stop" if not answer.tokens or answer.tokens[-1] == model.tokenizer.eos_token_id else "length"
    return {"id": ident, "object": "chat.completion", "created": created, "model": model.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": finish, "logprobs": logprobs(answer.logprobs)}],
            "usage": {"prompt_tokens": int(answer.timings.get("prefill_tokens", 0)),
                      "completion_tokens": len(answer.tokens),
                      "total_tokens": int(answer.timings.get("prefill_tokens", 0)) + len(answer.tokens)}}


def app(model, *, allow: list[Path], api_key: str | None = None, limits: Limits = Limits()):
    """The FastAPI app over a loaded `Model`."""
    worker = Worker(model, Files(allow, limits.media), limits)
    server = FastAPI(title="videoqa", docs_url=None, redoc_url=None)

    @server.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(Refused(401, "a valid API key is needed (Authorization: Bearer KEY)",
                                            "authentication_error").body(), status_code=401)
        return await call_next(request)

    @server.get("/health")
    async def health():
        return {"status": "ok"}

    @server.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": 0,
                                            "owned_by": "videoqa"}]}

    @server.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            job = await job_of(request, limits)
            worker.submit(job)
        except Refused as e:
            return JSONResponse(e.body(), status_code=e.status,
                                headers={"Retry-After": "1"} if e.status == 429 else None)
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if job.stream:
            return StreamingResponse(events(job, model.name, ident, created), media_type="text/event-stream")
        return await whole(job, model, ident, created)

    return server


def logprobs(entries: list[dict] | None) -> dict | None:
    """OpenAI's `logprobs` from an Answer's: each token's text, log-probability and bytes, and its alternatives."""
    if entries is None:
        return None

    def one(entry: dict) -> dict:
        return {"token": entry["text"], "logprob": entry["logprob"], "bytes": list(entry["text"].encode())}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top"]]} for e in entries]}


async def job_of(request, limits: Limits) -> Job:
    raw = await request.body()
    if len(raw) > limits.body:
        raise Refused(413, f"a request body of more than {limits.body} bytes", code="body_too_large")
    try:
        body = json.loads(raw)
    except ValueError:
        raise Refused(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "the request body must be a JSON object")
    settings, framing = settings_of(body)
    return Job(turns_of(body.get("messages")), settings, framing, bool(body.get("stream")))


async def pieces(job: Job):
    """What the worker puts for the job, as it comes (a text piece, then the Answer or a Refused)."""
    import asyncio

    while True:
        item = await asyncio.to_thread(job.out.get)
        yield item
        if not isinstance(item, str):
            return


async def whole(job: Job, model, ident: str, created: int):
    async for item in pieces(job):
        if isinstance(item, Refused):
            return JSONResponse(item.body(), status_code=item.status)
        if not isinstance(item, str):
            return JSONResponse(completion(model, item, created, ident))


async def events(job: Job, name: str, ident: str, created: int) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with [DONE]; a client gone away cancels the job."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                      "model": name, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}]}) + "\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for item in pieces(job):
            if isinstance(item, Refused):
                yield "data: " + json.dumps(item.body()) + "\n\n"
                break
            if isinstance(item, str):
                yield chunk({"content": item})
            else:
                yield chunk({}, "stop")
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()
