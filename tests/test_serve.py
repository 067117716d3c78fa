"""`videoqa serve` with the official `openai` client against a server on a loopback port (one per test session):
answers equal `videoqa ask`'s, streamed or not; a follow-up request prefills only its new turn (`usage`); images
and videos by file:// and data: URLs; refusals with OpenAI's error object (403 outside --allow, also through `..`
and a symbolic link; 400 for http(s) URLs and bad messages; 401 without the key); the server keeps serving."""

import base64
import json
import socket
import sys
import threading
import time
import urllib.request

import pytest

from conftest import ASSETS, assert_clean_failure, asset, needs_assets

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (the test extra)")
uvicorn = pytest.importorskip("uvicorn", reason="videoqa serve needs the serve extra")
pytestmark = needs_assets
VIDEO = asset("videos/videollava_sample_demo_1.mp4")
IMAGE = asset("images/videollava_desert.jpg")
QUESTION = "Why is this video funny?"


def started(model, **options) -> str:
    """A server over `model` on a free loopback port, in a thread for the rest of the session: its base URL."""
    from videoqa.serve import app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app(model, **options), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="session")
def served(tiny_loaded):
    return started(tiny_loaded, allow=[ASSETS])


@pytest.fixture(scope="session")
def client(served):
    return openai.OpenAI(base_url=served, api_key="unused", max_retries=0)


def video_turn(url: str, question: str = QUESTION, kind: str = "video_url") -> dict:
    return {"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": question}]}


def test_an_answer_equals_ask_streamed_or_not(client, cli, tiny_model):
    asked = json.loads(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 8, "--json", "--no-cache").out)
    reply = client.chat.completions.create(model="tiny", messages=[video_turn(f"file://{VIDEO}")], max_tokens=8)
    assert reply.choices[0].message.content == asked["answer"] and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == len(asked["tokens"])
    assert reply.usage.prompt_tokens == asked["timings"]["prefill_tokens"]
    assert reply.choices[0].finish_reason == ("stop" if asked["tokens"][-1] == 2 else "length")
    chunks = list(client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=8,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == asked["answer"]
    assert chunks[-1].choices[0].finish_reason is not None


def test_a_follow_up_prefills_only_its_new_turn(client, tiny_loaded):
    first = client.chat.completions.create(model="tiny", messages=[video_turn(f"file://{VIDEO}")], max_tokens=6)
    messages = [video_turn(f"file://{VIDEO}"), {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "What is the baby holding?"}]
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    chat = tiny_loaded.chat(VIDEO)
    chat.ask(QUESTION, max_new_tokens=6)
    expected = chat.ask("What is the baby holding?", max_new_tokens=6)
    assert second.choices[0].message.content == expected.text
    assert second.usage.prompt_tokens == expected.timings["prefill_tokens"] < first.usage.prompt_tokens
    # the kept cache holds what the answer's text tokenizes back to (here what was generated, EOS aside)
    assert tiny_loaded.tokenizer(first.choices[0].message.content, add_special_tokens=False).input_ids == [
        t for t in chat.answers[0].tokens if t != tiny_loaded.tokenizer.eos_token_id]


def test_images_and_videos_by_data_url(client, tiny_loaded):
    image = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    asked = tiny_loaded.ask(IMAGE, "What is it?", max_new_tokens=6).text
    for url in (image, f"file://{IMAGE}"):
        reply = client.chat.completions.create(model="tiny", messages=[video_turn(url, "What is it?", "image_url")],
                                               max_tokens=6)
        assert reply.choices[0].message.content == asked and reply.frames == []
    video = "data:video/mp4;base64," + base64.b64encode(VIDEO.read_bytes()).decode()
    reply = client.chat.completions.create(model="tiny", messages=[video_turn(video, kind="input_video")],
                                           max_tokens=6)
    assert reply.choices[0].message.content == tiny_loaded.ask(VIDEO, QUESTION, max_new_tokens=6).text


def refused(client, messages, status: int, *words: str) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert raised.value.status_code == status
    error = raised.value.body
    assert set(error) >= {"message", "type", "code"} and "Traceback" not in error["message"]
    for word in words:
        assert word in error["message"], error


def test_refusals_are_openai_error_objects_and_the_server_goes_on(client, tiny_loaded, tmp_path):
    outside = tmp_path / "clip.mp4"
    outside.write_bytes(VIDEO.read_bytes())
    link = tmp_path / "inside"
    link.symlink_to(outside)
    refused(client, [video_turn(f"file://{outside}")], 403, "--allow")
    up = "/".join([".."] * len(ASSETS.resolve().parts))  # from the allowed directory up to / and down to the file
    refused(client, [video_turn(f"file://{ASSETS}/{up}{outside.resolve()}")], 403, "--allow")
    refused(client, [video_turn(str(link))], 403, "--allow")
    refused(client, [video_turn("https://example.com/clip.mp4")], 400, "not fetched")
    refused(client, [{"role": "assistant", "content": "hi"}], 400, "user")
    refused(client, [video_turn("data:video/mp4;base64,@@@")], 400, "base64")
    reply = client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=2)
    assert reply.choices[0].message.content is not None  # still serving
    assert [m.id for m in client.models.list().data] == [tiny_loaded.name]


def test_a_key_is_needed_when_one_is_set(tiny_loaded):
    base = started(tiny_loaded, allow=[ASSETS], api_key="sesame")
    wrong = openai.OpenAI(base_url=base, api_key="open", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=base, api_key="sesame", max_retries=0)
    assert right.models.list().data[0].id == tiny_loaded.name


def test_serve_refuses_another_host_without_a_key(cli):
    assert_clean_failure(cli("serve", "--host", "0.0.0.0"), 2, "--api-key")


def test_logprobs_equal_asks(client, cli, tiny_model):
    asked = json.loads(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 4, "--logprobs", 2, "--json",
                           "--no-cache").out)
    reply = client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=4,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in content] == [(e["text"], e["logprob"]) for e in asked["logprobs"]]
    assert [[t.token for t in c.top_logprobs] for c in content] == [[t["text"] for t in e["top"]]
                                                                   for e in asked["logprobs"]]


def test_a_body_past_the_cap_is_413(tiny_loaded):
    from videoqa.serve import Limits

    small = openai.OpenAI(base_url=started(tiny_loaded, allow=[ASSETS], limits=Limits(body=2048)), api_key="x",
                          max_retries=0)
    refused(small, [video_turn(str(VIDEO), "Why? " * 1000)], 413, "2048")
    assert small.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=2).choices


def test_a_client_gone_mid_stream_frees_the_worker(client):
    stream = client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=200,
                                            stream=True)
    next(iter(stream))
    stream.close()
    reply = client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO), "What?")], max_tokens=3)
    assert reply.usage.completion_tokens == 3


def health(base: str) -> dict:
    with urllib.request.urlopen(base.removesuffix("/v1") + "/health") as reply:
        return json.load(reply)


class FirstChat:
    """The tiny model with `before` run ahead of the first conversation it opens (a fake passed to the server):
    a gate that holds the worker while requests queue, or an out-of-memory error."""

    def __init__(self, model, before):
        self.model, self.before = model, before

    def __getattr__(self, name):
        return getattr(self.model, name)

    def chat(self, *args, **kwargs):
        before, self.before = self.before, None
        if before is not None:
            before()
        return self.model.chat(*args, **kwargs)


def gated(model, **options) -> tuple[str, threading.Event, threading.Event]:
    """A server whose worker, at its first request, waits for the gate: its URL, `entered`, `gate`."""
    entered, gate = threading.Event(), threading.Event()
    base = started(FirstChat(model, lambda: (entered.set(), gate.wait())), allow=[ASSETS], **options)
    return base, entered, gate


def test_requests_waiting_together_are_answered_in_one_batch_and_a_full_queue_is_429(tiny_loaded):
    """The worker is held; three new conversations wait (the queue holds three: a fourth is 429 with
    Retry-After), then are answered in one batch, each as `ask` answers it alone."""
    from videoqa.serve import Limits

    base, entered, gate = gated(tiny_loaded, limits=Limits(queue=3, batch=4))
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
    questions = [QUESTION, "What is it?", "Who is there?", "What happens next?"]
    expected = {q: tiny_loaded.ask(VIDEO, q, max_new_tokens=6).tokens for q in questions}
    replies = {}

    def ask(name, question):
        replies[name] = client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO), question)],
                                                       max_tokens=6)

    threads = [threading.Thread(target=ask, args=("held", QUESTION))]
    threads[0].start()
    entered.wait()
    for question in questions[1:]:
        threads.append(threading.Thread(target=ask, args=(question, question)))
        threads[-1].start()
    while health(base)["waiting"] < 3:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=2)
    assert raised.value.response.headers["retry-after"] == "1" and raised.value.body["type"] == "rate_limit_error"
    gate.set()
    for thread in threads:
        thread.join()
    assert replies["held"].timings["batch"] == 1
    for name, question in [("held", QUESTION), *((q, q) for q in questions[1:])]:
        assert replies[name].timings["batch"] == (1 if name == "held" else 3)
        text = tiny_loaded.tokenizer.decode(expected[question], skip_special_tokens=True).strip()
        assert replies[name].choices[0].message.content == text
        assert replies[name].usage.completion_tokens == len(expected[question])


def conversation(client, first: dict, follow_ups: list[str], stream: bool, ids: list | None = None) -> list[str]:
    """A conversation of one request per turn, each sending the messages so far: its answers (each reply's id
    added to `ids`)."""
    messages, answers = [first], []
    for question in [None, *follow_ups]:
        if question is not None:
            messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": question}]
        if stream:
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, stream=True))
            answers.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
            reply_ids = {c.id for c in chunks}
        else:
            reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
            answers.append(reply.choices[0].message.content)
            reply_ids = {reply.id}
        assert len(reply_ids) == 1
        (ids if ids is not None else []).extend(reply_ids)
    return answers


def test_eight_clients_at_once_get_the_answers_each_gets_alone(client):
    """8 concurrent clients x 5 requests (a conversation each, half of them streamed): every answer equals the
    one the same request gets alone, none is lost and none is duplicated."""
    firsts = [video_turn(str(VIDEO), f"Question {n}: what happens?") if n % 2 else
              video_turn(f"file://{IMAGE}", f"Question {n}: what is it?", "image_url") for n in range(8)]
    follow_ups = [[f"And then ({n}, {turn})?" for turn in range(4)] for n in range(8)]
    alone = [conversation(client, first, more, stream=False) for first, more in zip(firsts, follow_ups)]
    together: dict[int, list[str]] = {}
    ids: list[str] = []

    def run(n):
        together[n] = conversation(client, firsts[n], follow_ups[n], stream=n % 2 == 0, ids=ids)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(together) == list(range(8)) and len(set(ids)) == len(ids) == 40
    assert [together[n] for n in range(8)] == alone and all(len(answers) == 5 for answers in alone)


def out_of_memory():
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_is_503_and_the_server_goes_on(tiny_loaded):
    starved = openai.OpenAI(base_url=started(FirstChat(tiny_loaded, out_of_memory), allow=[ASSETS]), api_key="x",
                            max_retries=0)
    refused(starved, [video_turn(str(VIDEO))], 503, "out of memory")
    assert starved.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=2).choices


def test_a_request_past_its_time_limit_is_504_and_the_server_goes_on(tiny_loaded):
    from videoqa.serve import Limits

    base, entered, gate = gated(tiny_loaded, limits=Limits(seconds=1))
    late = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:  # the worker held: no answer within the second
        late.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=2)
    assert entered.is_set() and raised.value.status_code == 504 and "time limit" in raised.value.body["message"]
    gate.set()
    assert late.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=2).choices


def test_bad_settings_are_400_before_they_wait(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], temperature=-1)
    assert "temperature" in raised.value.body["message"]


def test_streaming_can_end_with_usage(client, tiny_loaded):
    chunks = list(client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    answer = tiny_loaded.ask(VIDEO, QUESTION, max_new_tokens=4)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(answer.tokens)
    assert chunks[-1].usage.prompt_tokens == answer.timings["prefill_tokens"]
    assert chunks[-2].choices[0].finish_reason == ("stop" if answer.tokens[-1] == 2 else "length")


def test_serve_without_the_extra_names_the_command(cli, monkeypatch):
    monkeypatch.delitem(sys.modules, "videoqa.serve", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed: importing it raises ImportError
    assert_clean_failure(cli("serve"), 2, "pip install 'videoqa[serve]'")


def test_start_end_and_frames_are_extra_body_fields(client, tiny_loaded):
    reply = client.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO))], max_tokens=6,
                                           extra_body={"frames": 4, "start": 1, "end": "00:03"})
    asked = tiny_loaded.ask(VIDEO, QUESTION, frames=4, start=1, end=3, max_new_tokens=6)
    assert reply.choices[0].message.content == asked.text and reply.frames == asked.frames
    assert len(reply.frames) == 4 and all(1 <= frame["time"] < 3 for frame in reply.frames)


def test_a_conversation_no_longer_kept_is_prefilled_again_with_the_same_answer(tiny_loaded, client):
    """With no memory for kept caches, a follow-up prefills the whole conversation, and its answer is the one the
    server that kept it gives."""
    from videoqa.serve import Limits

    forgetful = openai.OpenAI(base_url=started(tiny_loaded, allow=[ASSETS], limits=Limits(kept=1)), api_key="x",
                              max_retries=0)
    messages = [video_turn(str(VIDEO), "What is shown?")]
    first = forgetful.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    again = forgetful.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    kept = client.chat.completions.create(model="tiny", messages=messages[:1], max_tokens=6)
    assert kept.choices[0].message.content == first.choices[0].message.content
    follow_up = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert again.choices[0].message.content == follow_up.choices[0].message.content
    assert again.usage.prompt_tokens > first.usage.prompt_tokens > follow_up.usage.prompt_tokens


def test_a_video_seen_before_is_not_encoded_again(tiny_model, counted, monkeypatch, tmp_path):
    import videoqa

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=True)
    caching = openai.OpenAI(base_url=started(model, allow=[ASSETS]), api_key="x", max_retries=0)
    for question in ("What is shown?", "Who is there?"):
        caching.chat.completions.create(model="tiny", messages=[video_turn(str(VIDEO), question)], max_tokens=2)
    assert counted["towers"] == [8]  # the second conversation's video came from the feature cache


def test_a_data_url_past_the_media_cap_is_413(tiny_loaded):
    from videoqa.serve import Limits

    capped = openai.OpenAI(base_url=started(tiny_loaded, allow=[ASSETS], limits=Limits(media=1000)), api_key="x",
                           max_retries=0)
    image = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    refused(capped, [video_turn(image, "What is it?", "image_url")], 413, "1000 bytes")
