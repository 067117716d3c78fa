"""`videoqa serve`: OpenAI's chat completions over HTTP (FastAPI, uvicorn), the model loaded once.

A request's messages become the family's template turn by turn (`Chat`): user content parts `text`, `image_url`,
`video_url` (or `input_video`), each a `file://` URL or a path under an `--allow` directory, or a `data:` URL. One
worker thread answers from a bounded queue (429 when it is full): new conversations waiting together in one batch
on the batched decode path, a conversation that goes on from an earlier answer alone on that answer's kept `Chat`
(its KV cache: only the new turn is prefilled; kept least recently used, within a memory bound). An answer depends
on the messages alone: the cache holds what they tokenize to. Errors are OpenAI's error object with a status code,
never a traceback. (FastAPI is the optional extra `videoqa[serve]`: the CLI imports this module only for `videoqa
serve`.)
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
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from videoqa.errors import Exit, VideoQAError
from videoqa.output import Streamed

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
    seconds: float = 600.0  # a request's time limit, from its arrival to its last token
    batch: int = 4  # new conversations answered together at most
    kept: float | None = None  # bytes of KV caches of recent conversations kept; None: a quarter of what is free


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


@dataclass(eq=False)
class Job:
    """One request for the worker: what to answer and how, and where its pieces go (text pieces, then the Answer
    or a Refused); `cancelled` once nobody waits for it (the client gone, the time limit past)."""

    turns: list[Turn]
    settings: dict
    framing: dict  # frames, fps; start and end (the first file's window)
    chosen: Any  # the settings as checked (a videoqa Settings): what a batch shares
    stream: bool
    stream_usage: bool = False  # stream_options.include_usage: a last chunk with `usage`
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float = 0.0

    @property
    def alike(self) -> tuple | None:
        """What the jobs answered in one batch share (one sampler, one trace); None for a job answered alone: a
        seeded sample, whose draws would differ in a batch."""
        sampling = self.chosen.sampling
        return None if sampling.temperature > 0 and sampling.seed is not None else (sampling, self.chosen.logprobs)


def conversation_key(turns: list[Turn], framing: dict) -> str:
    return hashlib.sha256(json.dumps([[t.media, t.text, t.answer] for t in turns] + [framing]).encode()).hexdigest()


def refusal(error: BaseException) -> Refused:
    """The error object for what went wrong: out of memory 503 (the server goes on), a bad request 400, a bug
    500 (with its reason, never a traceback)."""
    from videoqa import memory

    if isinstance(error, Refused):
        return error
    if isinstance(error, VideoQAError):
        short = error.code == Exit.MEMORY
        return Refused(503 if short else 400, str(error), "server_error" if short else "invalid_request_error")
    status = 503 if memory.is_oom(error) else 500
    return Refused(status, f"{type(error).__name__}: {error}", "server_error")


def cache_bytes(chat) -> int:
    return sum(t.nbytes for layer in chat.cache.layers if layer.is_initialized for t in (layer.keys, layer.values))


class Worker:
    """The model's one thread. Jobs wait in a bounded queue (429 past it); new conversations that wait together
    are answered in one batch (`session.together`), a conversation going on from a kept Chat alone (its KV cache
    holds everything before the new turn: only that is prefilled). Chats are kept least recently used first out
    while their KV caches fit in `kept` bytes."""

    def __init__(self, model, files: Files, limits: Limits, kept: float):
        self.model, self.files, self.limits, self.kept = model, files, limits, kept
        self.waiting: deque[Job] = deque()
        self.ready = threading.Condition()
        self.chats: OrderedDict[str, Any] = OrderedDict()
        threading.Thread(target=self.run, daemon=True, name="videoqa-model").start()

    def submit(self, job: Job) -> None:
        job.deadline = time.monotonic() + self.limits.seconds
        with self.ready:
            if len(self.waiting) >= self.limits.queue:
                raise Refused(429, "the server is busy: too many requests waiting", "rate_limit_error")
            self.waiting.append(job)
            self.ready.notify()

    def take(self) -> list[Job]:
        """The next job, with the jobs waiting that one batch answers with it: new conversations alike."""
        with self.ready:
            while not self.waiting:
                self.ready.wait()
            first = self.waiting.popleft()
            if first.alike is None or self.key(first) in self.chats:
                return [first]
            batch = [first, *(job for job in self.waiting if job.alike == first.alike
                              and self.key(job) not in self.chats)][: self.limits.batch]
            for job in batch[1:]:
                self.waiting.remove(job)
            return batch

    @staticmethod
    def key(job: Job) -> str:
        """The kept conversation a job goes on from."""
        return conversation_key(job.turns[:-1], job.framing)

    def run(self) -> None:
        while True:
            ready = []
            for job in self.take():
                try:
                    if not job.cancelled.is_set():
                        ready.append((job, self.chat_for(job)))
                except Exception as e:  # noqa: BLE001 (this job's alone: the others are answered)
                    job.out.put(refusal(e))
            try:
                if len(ready) == 1 and ready[0][1].cache is not None:
                    self.alone(*ready[0])
                elif ready:
                    self.together(ready)
            except Exception as e:  # noqa: BLE001 (the server keeps serving; each client gets the reason)
                for job, _ in ready:
                    job.out.put(refusal(e))

    def chat_for(self, job: Job):
        """The conversation up to the job's new turn, its files added: a kept Chat that ended where the job's
        messages do, or one rebuilt from the messages (earlier answers taken as given)."""
        brought = [[], *(turn.media for turn in job.turns[1:])]  # the files each turn adds (the first's: the chat's)
        chat = self.chats.pop(self.key(job), None)
        if chat is None:
            if not job.turns[0].media:
                raise Refused(400, "the first user message needs an image_url or video_url part")
            chat = self.model.chat([self.files.path(url) for url in job.turns[0].media], **job.framing)
            for turn, urls in zip(job.turns[:-1], brought):
                self.add(chat, urls, job)
                chat.take(turn.text, self.answer_ids(turn.answer))
        self.add(chat, brought[-1], job)
        return chat

    def answer_ids(self, text: str) -> list[int]:
        """An answer given as text, as the conversation goes on with it: its tokens again."""
        return self.model.tokenizer(text, add_special_tokens=False).input_ids

    def add(self, chat, urls: list[str], job: Job) -> None:
        for url in urls:
            chat.add(self.files.path(url), **{k: v for k, v in job.framing.items() if k in ("frames", "fps")})

    def alone(self, job: Job, chat) -> None:
        """A conversation's next turn on its kept cache, its text streamed to the job as it comes."""
        text = Streamed(self.model.tokenizer, job.chosen.stop)
        tokens = chat.tokens(job.turns[-1].text, **job.settings)
        try:
            for token in tokens:
                if job.cancelled.is_set():  # nobody waits: the turn is dropped
                    return
                self.put(job, text.add(token))
        finally:
            tokens.close()
        self.finish(job, chat, text, batch=1)

    def together(self, ready: list[tuple[Job, Any]]) -> None:
        """New conversations answered in one batch, each row's text streamed to its job; if the batch fails
        before its first token, each is answered alone."""
        from videoqa.session import together

        jobs, chats = [job for job, _ in ready], [chat for _, chat in ready]
        texts = [Streamed(self.model.tokenizer, job.chosen.stop) for job in jobs]
        started = False
        try:
            for row, token in together(chats, [job.turns[-1].text for job in jobs], [job.settings for job in jobs],
                                       alive=lambda row: not jobs[row].cancelled.is_set()):
                started = True
                self.put(jobs[row], texts[row].add(token))
        except Exception:
            if started or len(ready) == 1:
                raise
            for one in ready:
                self.together([one])
            return
        for job, chat, text in zip(jobs, chats, texts):
            if not job.cancelled.is_set():
                self.finish(job, chat, text, batch=len(jobs))

    @staticmethod
    def put(job: Job, piece: str) -> None:
        if piece:
            job.out.put(piece)

    def finish(self, job: Job, chat, text: Streamed, *, batch: int) -> None:
        """The job's last text and its Answer (its timings say how many were answered in its `batch`); the
        conversation kept under the messages that go on from it."""
        self.put(job, text.end())
        answer = chat.answers[-1]
        answer.timings = {**answer.timings, "batch": batch}
        chat.retake(self.answer_ids(answer.text))  # as the next request's messages will give it
        self.keep(conversation_key([*job.turns[:-1], Turn(job.turns[-1].media, job.turns[-1].text, answer.text)],
                                   job.framing), chat)
        job.out.put(answer)

    def keep(self, key: str, chat) -> None:
        """Keep `chat`, the least recently used out while their KV caches are more than `kept` bytes."""
        self.chats[key] = chat
        while self.chats and sum(map(cache_bytes, self.chats.values())) > self.kept:
            self.chats.popitem(last=False)


def settings_of(body: dict) -> tuple[dict, dict]:
    """The request's sampling settings (OpenAI's names read as videoqa's, `stop` a string or a list) and its
    framing: videoqa's own `frames`, `fps`, and `start` and `end` (the first file's window), as extra body
    fields."""
    settings = {ours: body[theirs] for theirs, ours in SAMPLING.items() if body.get(theirs) is not None}
    if body.get("logprobs"):
        settings["logprobs"] = body.get("top_logprobs") or 0
    if body.get("stop") is not None:
        settings["stop"] = body["stop"]
    framing = {name: body[name] for name in ("frames", "fps", "start", "end") if body.get(name) is not None}
    return settings, framing


def completion(model, answer, stops: tuple[str, ...], created: int, ident: str) -> dict:
    """OpenAI's chat.completion object for an Answer, with videoqa's `timings` beside `usage` (as llama.cpp's
    server adds its own: seconds of each stage, and `batch`, the requests answered together with it) and `frames`,
    the first video's frames the answer saw ({"index", "time"})."""
    return {"id": ident, "object": "chat.completion", "created": created, "model": model.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": finish_of(model, answer, stops), "logprobs": logprobs(answer.logprobs)}],
            "usage": usage_of(answer), "timings": answer.timings, "frames": answer.frames}


def finish_of(model, answer, stops: tuple[str, ...]) -> str:
    """`length` when the answer ran out of tokens, else `stop` (its EOS or a stop string)."""
    ended = not answer.tokens or answer.tokens[-1] == model.tokenizer.eos_token_id
    return "stop" if ended or model.stopped(answer.tokens, stops) else "length"


def usage_of(answer) -> dict:
    """What the turn prefilled (a follow-up's new tokens alone: the rest was in its kept cache) and generated."""
    prompt = int(answer.timings.get("prefill_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": len(answer.tokens), "total_tokens": prompt +
            len(answer.tokens)}


def app(model, *, allow: list[Path], api_key: str | None = None, limits: Limits = Limits()):
    """The FastAPI app over a loaded `Model`."""
    from videoqa import memory

    kept = limits.kept if limits.kept is not None else memory.free(model.net.device)[0] / 4
    worker = Worker(model, Files(allow, limits.media), limits, kept)
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
        return {"status": "ok", "waiting": len(worker.waiting)}

    @server.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": 0,
                                            "owned_by": "videoqa"}]}

    @server.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            job = await job_of(request, model, limits)
            worker.submit(job)
        except Refused as e:
            return JSONResponse(e.body(), status_code=e.status,
                                headers={"Retry-After": "1"} if e.status == 429 else None)
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if job.stream:
            return StreamingResponse(events(job, request, model, ident, created), media_type="text/event-stream")
        return await whole(job, request, model, ident, created)

    return server


def logprobs(entries: list[dict] | None) -> dict | None:
    """OpenAI's `logprobs` from an Answer's: each token's text, log-probability and bytes, and its alternatives."""
    if entries is None:
        return None

    def one(entry: dict) -> dict:
        return {"token": entry["text"], "logprob": entry["logprob"], "bytes": list(entry["text"].encode())}

    return {"content": [{**one(e), "top_logprobs": [one(t) for t in e["top"]]} for e in entries]}


async def job_of(request, model, limits: Limits) -> Job:
    """The request as a Job, its settings checked (a bad one is a 400 before it waits for the worker)."""
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
    turns = turns_of(body.get("messages"))
    try:
        chosen = model.settings(**{k: v for k, v in framing.items() if k in ("frames", "fps")}, **settings)
    except VideoQAError as e:
        raise Refused(400, str(e)) from None
    usage = isinstance(body.get("stream_options"), dict) and bool(body["stream_options"].get("include_usage"))
    return Job(turns, settings, framing, chosen, bool(body.get("stream")), usage)


WAKE = 0.25  # seconds between a waiting request's looks at its client and its time limit


async def pieces(job: Job, request: Request):
    """What the worker puts for the job, as it comes (text pieces, then the Answer or a Refused). Past the time
    limit, a 504; the client gone, nothing more; either way the job is cancelled (the worker drops it)."""
    import asyncio

    while True:
        try:
            item = await asyncio.to_thread(job.out.get, timeout=WAKE)
        except queue.Empty:
            if time.monotonic() > job.deadline:
                job.cancelled.set()
                yield Refused(504, "no answer within the time limit", "server_error")
                return
            if await request.is_disconnected():
                job.cancelled.set()
                return
            continue
        yield item
        if not isinstance(item, str):
            return


async def whole(job: Job, request: Request, model, ident: str, created: int):
    async for item in pieces(job, request):
        if isinstance(item, Refused):
            return JSONResponse(item.body(), status_code=item.status)
        if not isinstance(item, str):
            return JSONResponse(completion(model, item, job.chosen.stop, created, ident))


async def events(job: Job, request: Request, model, ident: str, created: int) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with [DONE] (after a chunk with `usage` when the request
    asked for it); a client gone away cancels the job."""
    def chunk(delta: dict | None, finish: str | None = None, **more) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                      "model": model.name, "choices": choices, **more}) + "\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for item in pieces(job, request):
            if isinstance(item, Refused):
                yield "data: " + json.dumps(item.body()) + "\n\n"
                break
            if isinstance(item, str):
                yield chunk({"content": item})
                continue
            yield chunk({}, finish_of(model, item, job.chosen.stop))
            if job.stream_usage:
                yield chunk(None, usage=usage_of(item), timings=item.timings)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()
