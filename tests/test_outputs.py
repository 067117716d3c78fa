"""What an answer carries beside its text: each token's log-probability and likeliest alternatives (`--logprobs N`,
API `logprobs=N`), hidden states and attention weights (API), `--explain`'s share of the attention per frame,
`--sheet`'s contact sheet and `Model.embed`. Compared with transformers' `generate(output_scores=True,
output_hidden_states=True, output_attentions=True)` and its own logits warpers on the same weights and inputs
(float32); the Qwen and SmolVLM2 families' checks are in their own files."""

import json

import pytest
import torch
from PIL import Image

import videoqa
from conftest import asset, assert_clean_failure, check_logprobs, check_traced, needs_assets, reference_net
from conftest import reference_pixels, reference_prompt, reference_traced
from videoqa.errors import Exit
from videoqa.frames import read_frames
from videoqa.sheet import PAD, label_height

pytestmark = needs_assets
VIDEO, OTHER = asset("videos/videollava_sample_demo_1.mp4"), asset("videos/videollava_sample_demo_3.mp4")
QUESTION = "Why is this video funny?"
model = pytest.fixture(lambda tiny_loaded: tiny_loaded, name="model")  # the session's tiny Video-LLaVA, loaded


def video_reference(path, video=VIDEO, frames: int = 2, question: str = QUESTION):
    """transformers' net, the processor-style prompt ids and the pixel input for `frames` frames of `video`."""
    net, tokenizer = reference_net(path)
    sampled = read_frames(video, frames)
    ids = reference_prompt(net, tokenizer, sampled, question)
    return net, ids, {"pixel_values_videos": reference_pixels(net, list(sampled.pixels))[None]}


TRACED = dict(max_new_tokens=4, logprobs=3, hidden_states=True, attentions=True)


@pytest.mark.parametrize("checkpoint", ["tiny_model", "tiny_next_video"])  # Video-LLaVA, LLaVA-NeXT-Video
def test_llava_video_outputs_equal_generate(request, checkpoint):
    path = request.getfixturevalue(checkpoint)
    answer = videoqa.load(path, device="cpu", dtype="float32", cache=False).ask(VIDEO, QUESTION, frames=2, **TRACED)
    net, ids, inputs = video_reference(path)
    check_traced(answer, reference_traced(net, ids, 4, **inputs), len(ids), 3)
    assert answer.hidden_states.shape[1] == net.config.text_config.num_hidden_layers + 1  # embeddings first


def test_onevision_outputs_equal_generate(tmp_path_factory):
    from onevision_fixtures import build_llava_onevision, onevision_video_tokens, reference_onevision_prompt
    from onevision_fixtures import siglip_reference_pixels

    path = build_llava_onevision(tmp_path_factory.mktemp("onevision_traced"))
    answer = videoqa.load(path, device="cpu", dtype="float32", cache=False).ask(VIDEO, QUESTION, frames=2, **TRACED)
    net, tokenizer = reference_net(path)
    ids = reference_onevision_prompt(tokenizer, QUESTION, "<video>", onevision_video_tokens(net, 2))
    pixels = siglip_reference_pixels(net, list(read_frames(VIDEO, 2).pixels))[None]
    check_traced(answer, reference_traced(net, ids, 4, pixel_values_videos=pixels), len(ids), 3)


def test_llava_15_image_outputs_equal_generate(tmp_path_factory):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from onevision_fixtures import build_llava_15, reference_llava_15_prompt

    path = build_llava_15(tmp_path_factory.mktemp("llava15_traced"))
    image = asset("images/videollava_desert.jpg")
    answer = videoqa.load(path, device="cpu", dtype="float32", cache=False).ask(image, QUESTION, **TRACED)
    net, tokenizer = reference_net(path)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pixels = processor([Image.open(image).convert("RGB")], return_tensors="pt").pixel_values
    ids = reference_llava_15_prompt(tokenizer, QUESTION)
    check_traced(answer, reference_traced(net, ids, 4, pixel_values=pixels), len(ids), 3)


def test_llava_next_anyres_image_outputs_equal_generate(tiny_next):
    from conftest import NEXT_IMAGE_PROMPT, reference_next_image

    image = asset("images/videollava_waterview.jpg")
    answer = videoqa.load(tiny_next, device="cpu", dtype="float32", cache=False).ask(image, QUESTION, **TRACED)
    net, ids, inputs = reference_next_image(tiny_next, Image.open(image).convert("RGB"),
                                            NEXT_IMAGE_PROMPT.format(q=QUESTION))
    check_traced(answer, reference_traced(net, ids, 4, **inputs), len(ids), 3)


def test_sampled_logprobs_are_those_of_the_distribution_sampled_from(model, tiny_model):
    """Under sampling each token's log-probability is the one after temperature, top-k and top-p, as transformers'
    own warpers (in generate's order) make it from the model forward's logits."""
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    sampling = dict(temperature=0.7, top_k=20, top_p=0.9, seed=3)
    answer = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=6, logprobs=30, **sampling)
    net, ids, inputs = video_reference(tiny_model)
    row = torch.tensor([ids + answer.tokens])
    with torch.no_grad():
        logits = net(input_ids=row, attention_mask=torch.ones_like(row), **inputs).logits[0, len(ids) - 1 : -1]
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    for i, entry in enumerate(answer.logprobs):
        warped = warpers(row[:, : len(ids) + i], logits[i][None].float())[0].log_softmax(-1)
        kept = int(warped.isfinite().sum())
        assert abs(entry["logprob"] - float(warped[entry["token"]])) < 1e-4
        assert len(entry["top"]) == kept <= 20  # what top-k and top-p leave out is not listed
        best = warped.topk(kept)
        assert [e["token"] for e in entry["top"]] == best.indices.tolist()
        assert max(abs(e["logprob"] - float(v)) for e, v in zip(entry["top"], best.values)) < 1e-4
        assert entry["logprob"] > float(logits[i].float().log_softmax(-1)[entry["token"]]) + 1  # renormalized


def test_ask_json_carries_logprobs_and_the_token_texts(cli, tiny_model):
    record = json.loads(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", 2, "-n", 4, "--logprobs", 2,
                            "--json").out)
    net, ids, inputs = video_reference(tiny_model)
    out = reference_traced(net, ids, 4, **inputs)
    check_logprobs(record["logprobs"], record["tokens"], [s[0] for s in out.scores], 2)
    tokenizer = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False).tokenizer
    texts = [entry["text"] for entry in record["logprobs"]]
    assert "".join(texts).lstrip() == tokenizer.decode(record["tokens"])  # each token's text where it stands
    spaced = tokenizer.convert_ids_to_tokens(record["tokens"][0]).startswith("▁")  # SentencePiece's space mark
    assert texts[0].startswith(" ") == spaced
    assert set(record["logprobs"][0]) == {"token", "text", "logprob", "top"}
    plain = json.loads(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", 2, "-n", 4, "--json").out)
    assert "logprobs" not in plain and plain["tokens"] == record["tokens"]


def test_logprobs_zero_gives_each_tokens_own(cli, tiny_model):
    record = json.loads(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", 2, "-n", 3, "--logprobs", 0,
                            "--json").out)
    assert [e["top"] for e in record["logprobs"]] == [[]] * 3 and all(e["logprob"] < 0 for e in record["logprobs"])


def test_caption_batch_records_carry_logprobs_equal_generate(cli, tiny_model, tmp_path):
    out = tmp_path / "captions.jsonl"
    prompt = "What happens?"
    result = cli("caption", VIDEO, OTHER, "-m", tiny_model, "--frames", 2, "-n", 4, "--logprobs", 2, "-b", 2,
                 "--prompt", prompt, "--out", out)
    assert result.code == 0, result
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for video, record in zip((VIDEO, OTHER), records):
        net, ids, inputs = video_reference(tiny_model, video, question=prompt)
        reference = reference_traced(net, ids, 4, **inputs)
        check_logprobs(record["logprobs"], record["tokens"], [s[0] for s in reference.scores], 2)


def test_timeline_records_carry_logprobs(cli, tiny_model, tmp_path):
    out = tmp_path / "timeline.jsonl"
    assert cli("timeline", VIDEO, "-m", tiny_model, "--frames", 2, "-n", 3, "--logprobs", 1, "--segments", 2,
               "--out", out).code == 0
    for record in map(json.loads, out.read_text().splitlines()):
        entries = record["logprobs"]
        assert [e["token"] for e in entries] == record["tokens"]
        assert all(e["top"][0]["token"] == e["token"] and e["top"][0]["logprob"] == e["logprob"] for e in entries)


def test_chat_set_logprobs(cli, tiny_model, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"/set logprobs 2\nWhat happens?\n")))
    result = cli("chat", VIDEO, "-m", tiny_model, "--frames", 2, "-n", 3, "--json")
    record = json.loads(result.out)
    assert result.code == 0 and len(record["logprobs"]) == len(record["tokens"]) == 3
    assert all(len(e["top"]) == 2 for e in record["logprobs"])


def test_hidden_state_layers_asked_for(model):
    every = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=3, hidden_states=True)
    some = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=3, hidden_states=[0, -1])
    assert some.hidden_states.shape == (3, 2, every.hidden_states.shape[-1])
    assert torch.equal(some.hidden_states, every.hidden_states[:, [0, -1]])
    assert every.attentions is None and every.logprobs is None
    with pytest.raises(videoqa.VideoQAError, match="hidden_states"):
        model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=1, hidden_states=[99])


def video_share(answer, ids: list[int], placeholder: int) -> float:
    """By hand from the attention weights: the answer's mean share (over tokens, layers and heads) on the video's
    positions."""
    where = [i for i, token in enumerate(ids) if token == placeholder]
    return sum(float(a.mean((0, 1))[where].sum()) for a in answer.attentions) / len(answer.attentions)


def test_explain_shares_sum_to_the_videos_share_and_follow_the_frames(model, tiny_model):
    answer = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=4, attentions=True, explain=True)
    _, ids, _ = video_reference(tiny_model)
    shares = [frame["attention"] for frame in answer.frames]
    assert len(shares) == 2 and all(s > 0 for s in shares)
    assert abs(sum(shares) - video_share(answer, ids, model.tokenizer.convert_tokens_to_ids("<video>"))) < 1e-5
    other = model.ask(OTHER, QUESTION, frames=2, max_new_tokens=4, explain=True)
    assert not torch.allclose(torch.tensor(shares), torch.tensor([f["attention"] for f in other.frames]))


def test_explain_on_onevision_counts_the_newline_row_for_the_last_frame(tmp_path_factory):
    from onevision_fixtures import build_llava_onevision, onevision_video_tokens, reference_onevision_prompt

    path = build_llava_onevision(tmp_path_factory.mktemp("onevision_explain"))
    model = videoqa.load(path, device="cpu", dtype="float32", cache=False)
    answer = model.ask(VIDEO, QUESTION, frames=2, max_new_tokens=3, attentions=True, explain=True)
    net, tokenizer = reference_net(path)
    ids = reference_onevision_prompt(tokenizer, QUESTION, "<video>", onevision_video_tokens(net, 2))
    where = [i for i, token in enumerate(ids) if token == tokenizer.convert_tokens_to_ids("<video>")]
    per = (len(where) - 1) // 2  # each frame's pooled rows, then one newline row after the last frame
    means = [a.mean((0, 1)) for a in answer.attentions]
    first = sum(float(m[where[:per]].sum()) for m in means) / len(means)
    last = sum(float(m[where[per:]].sum()) for m in means) / len(means)
    assert abs(answer.frames[0]["attention"] - first) < 1e-5 and abs(answer.frames[1]["attention"] - last) < 1e-5


def test_explain_prints_a_line_per_frame_and_json_has_the_shares(cli, tiny_model):
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", 3, "-n", 3, "--explain", "--json", "-q")
    record = json.loads(result.out)
    lines = [line for line in result.err.splitlines() if "%" in line]
    assert result.code == 0 and len(lines) == 3 and all("attention" in f for f in record["frames"])
    for line, frame in zip(lines, record["frames"]):
        assert f"{100 * frame['attention']:5.1f}%" in line and "█" in line


@pytest.mark.parametrize("args,words", [(["--explain", "--choices", "a|b"], ["--explain", "--choices"]),
                                        (["--logprobs", "2", "--choices", "a|b"], ["--logprobs", "--choices"]),
                                        (["--explain"], ["--explain", "image"])])
def test_explain_and_logprobs_refusals(cli, tiny_model, args, words):
    media = VIDEO if "--choices" in args else asset("images/videollava_desert.jpg")
    assert_clean_failure(cli("ask", media, QUESTION, "-m", tiny_model, *args), Exit.USAGE, *words)


def test_explain_without_an_answer_token_says_so(cli, tiny_model):
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", 2, "-n", 0, "--explain", "--json")
    assert result.code == 0 and "no answer token" in result.err and json.loads(result.out)["tokens"] == []


def sheet_size(frames: int, height: int, width: int, tile_width: int = 320) -> tuple[int, int]:
    """The contact sheet's size by the layout's rule (videoqa/sheet.py): ceil(sqrt(N)) columns."""
    columns = next(c for c in range(1, frames + 1) if c * c >= frames)
    rows = -(-frames // columns)
    tile_height = round(height * tile_width / width)
    return (columns * tile_width + (columns + 1) * PAD,
            rows * (tile_height + label_height(tile_width)) + (rows + 1) * PAD)


def tiles_show_frames(path, frames: int, size: tuple[int, int], tile_width: int = 320) -> bool:
    """Every tile's centre holds picture, not the sheet's background."""
    sheet = Image.open(path).convert("RGB")
    columns = next(c for c in range(1, frames + 1) if c * c >= frames)
    tile_height = round(size[0] * tile_width / size[1])
    for n in range(frames):
        row, column = divmod(n, columns)
        x = PAD + column * (tile_width + PAD) + tile_width // 2
        y = PAD + row * (tile_height + label_height(tile_width) + PAD) + tile_height // 2
        if sheet.getpixel((x, y)) == (24, 24, 24):
            return False
    return True


def test_ask_sheet_draws_the_sampled_frames(cli, tiny_model, tmp_path):
    path = tmp_path / "frames.png"
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", 3, "-n", 2, "--explain", "--sheet", path)
    height, width = read_frames(VIDEO, 1).pixels.shape[1:3]
    assert result.code == 0 and Image.open(path).size == sheet_size(3, height, width)
    assert tiles_show_frames(path, 3, (height, width))


def test_chat_sheet_and_timeline_sheet(cli, tiny_model, tmp_path, monkeypatch):
    import io
    import sys

    chat_sheet, timeline_sheet = tmp_path / "chat.png", tmp_path / "timeline.png"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"/sheet {chat_sheet}\n".encode())))
    assert cli("chat", VIDEO, "-m", tiny_model, "--frames", 2).code == 0
    height, width = read_frames(VIDEO, 1).pixels.shape[1:3]
    assert Image.open(chat_sheet).size == sheet_size(2, height, width)
    result = cli("timeline", VIDEO, "-m", tiny_model, "--frames", 2, "-n", 2, "--segments", 2, "--out",
                 tmp_path / "t.srt", "--sheet", timeline_sheet)
    assert result.code == 0 and Image.open(timeline_sheet).size == sheet_size(4, height, width)  # 2 segments x 2
    assert tiles_show_frames(timeline_sheet, 4, (height, width))


def test_embed_is_the_unit_mean_of_the_video_features(model, tiny_model):
    net, _, inputs = video_reference(tiny_model)
    with torch.no_grad():
        rows = net.model.get_video_features(**inputs).pooler_output.reshape(-1, net.config.text_config.hidden_size)
    expected = rows.mean(0) / rows.mean(0).norm()
    embedding = model.embed(VIDEO, 2)
    assert embedding.shape == expected.shape and torch.allclose(embedding, expected, atol=1e-5)
    assert not torch.allclose(embedding, model.embed(OTHER, 2), atol=1e-3)
