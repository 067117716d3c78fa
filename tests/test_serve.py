"""`videoqa serve` with the official `openai` client against a server on a loopback port (one per test session):
answers equal `videoqa ask`'s, streamed or not; a follow-up request prefills only its new turn (`usage`); images
and videos by file:// and data: URLs; refusals with OpenAI's error object (403 outside --allow, also through `..`
and a symbolic link; 400 for http(s) URLs and bad messages; 401 without the key); the server keeps serving."""

import base64
import json
import socket
import threading
import time

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


def test_images_and_videos_by_data_url(client, tiny_loaded):
    image = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    reply = client.chat.completions.create(model="tiny", messages=[video_turn(image, "What is it?", "image_url")],
                                           max_tokens=6)
    assert reply.choices[0].message.content == tiny_loaded.ask(IMAGE, "What is it?", max_new_tokens=6).text
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
