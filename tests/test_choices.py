"""Multiple choice (`ask --choices`, `Model.ask(choices=...)`): each option's summed log-probability after the
prompt equals transformers' model forward on prompt + option (|difference| < 1e-4, float32), for options of
different token lengths; the answer is the best option; the prompt is prefilled once."""

import json

import pytest

import videoqa
from conftest import asset, assert_clean_failure, needs_assets, reference_logprob, reference_net, reference_pixels
from conftest import reference_prompt
from onevision_fixtures import onevision_video_tokens, reference_onevision_prompt, siglip_reference_pixels
from videoqa.errors import Exit
from videoqa.frames import read_frames

pytestmark = needs_assets
VIDEO = asset("videos/videollava_sample_demo_1.mp4")
QUESTION = "Which sport is this?"
OPTIONS = ["tennis", "golf", "a soccer ball game on grass"]  # one token, one token, several


def check(answer, expected: dict[str, float]) -> None:
    scored = {c["text"]: c for c in answer.choices}
    assert list(scored) == OPTIONS and len({len(c["tokens"]) for c in answer.choices}) > 1
    for text, logprob in expected.items():
        assert abs(scored[text]["logprob"] - logprob) < 1e-4, (text, scored[text]["logprob"], logprob)
        assert scored[text]["mean_logprob"] == pytest.approx(scored[text]["logprob"] / len(scored[text]["tokens"]))
    assert answer.text == max(expected, key=expected.get) and answer.tokens == scored[answer.text]["tokens"]


@pytest.mark.parametrize("checkpoint", ["tiny_model", "tiny_next_video"])  # Video-LLaVA, LLaVA-NeXT-Video
def test_llava_video_options_equal_the_model_forward(request, checkpoint):
    path = request.getfixturevalue(checkpoint)
    model = videoqa.load(path, device="cpu", dtype="float32", cache=False)
    answer = model.ask(VIDEO, QUESTION, choices=OPTIONS, frames=2)
    net, tokenizer = reference_net(path)
    frames = read_frames(VIDEO, 2)
    ids = reference_prompt(net, tokenizer, frames, QUESTION)
    pixels = reference_pixels(net, list(frames.pixels))[None]
    check(answer, {c["text"]: reference_logprob(net, ids, c["tokens"], pixel_values_videos=pixels)
                   for c in answer.choices})
    assert answer.timings["prefill_tokens"] == len(ids)  # the prompt once, whatever the options


def test_onevision_options_equal_the_model_forward(tmp_path_factory):
    from onevision_fixtures import build_llava_onevision

    path = build_llava_onevision(tmp_path_factory.mktemp("onevision_choices"))
    model = videoqa.load(path, device="cpu", dtype="float32", cache=False)
    answer = model.ask(VIDEO, QUESTION, choices=OPTIONS, frames=2)
    net, tokenizer = reference_net(path)
    ids = reference_onevision_prompt(tokenizer, QUESTION, "<video>", onevision_video_tokens(net, 2))
    pixels = siglip_reference_pixels(net, list(read_frames(VIDEO, 2).pixels))[None]
    check(answer, {c["text"]: reference_logprob(net, ids, c["tokens"], pixel_values_videos=pixels)
                   for c in answer.choices})


def test_the_cli_prints_the_best_option_and_its_json_lists_them_all(cli, tiny_model):
    text = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", 2, "--choices", "|".join(OPTIONS))
    record = json.loads(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--frames", 2, "--json", "--choices",
                            "|".join(OPTIONS)).out)
    assert text.code == 0 and text.out.strip() == record["answer"] in OPTIONS
    assert [c["text"] for c in record["choices"]] == OPTIONS
    assert set(record["choices"][0]) == {"text", "logprob", "mean_logprob", "tokens"}


@pytest.mark.parametrize("given", ["tennis", "tennis|", "|golf"])
def test_fewer_than_two_options_is_a_usage_error(cli, tiny_model, given):
    assert_clean_failure(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--choices", given), Exit.USAGE, "--choices")


def test_an_image_question_llava_15_options_equal_the_model_forward(tmp_path_factory):
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from onevision_fixtures import build_llava_15, reference_llava_15_prompt

    path = build_llava_15(tmp_path_factory.mktemp("llava15_choices"))
    image = asset("images/videollava_desert.jpg")
    answer = videoqa.load(path, device="cpu", dtype="float32", cache=False).ask(image, QUESTION, choices=OPTIONS)
    net, tokenizer = reference_net(path)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pixels = processor([Image.open(image).convert("RGB")], return_tensors="pt").pixel_values
    ids = reference_llava_15_prompt(tokenizer, QUESTION)
    check(answer, {c["text"]: reference_logprob(net, ids, c["tokens"], pixel_values=pixels) for c in answer.choices})


def test_an_anyres_image_llava_next_options_equal_the_model_forward(tiny_next):
    from PIL import Image

    from conftest import NEXT_IMAGE_PROMPT, reference_next_image

    image = asset("images/videollava_waterview.jpg")
    answer = videoqa.load(tiny_next, device="cpu", dtype="float32", cache=False).ask(image, QUESTION, choices=OPTIONS)
    net, ids, inputs = reference_next_image(tiny_next, Image.open(image).convert("RGB"),
                                            NEXT_IMAGE_PROMPT.format(q=QUESTION))
    check(answer, {c["text"]: reference_logprob(net, ids, c["tokens"], **inputs) for c in answer.choices})


@pytest.mark.parametrize("traced", [{"logprobs": 0}, {"hidden_states": True}, {"explain": True}])
def test_choices_refuse_what_only_a_generated_answer_carries(tiny_model, traced):
    model = videoqa.load(tiny_model, device="cpu", dtype="float32", cache=False)
    with pytest.raises(videoqa.VideoQAError, match=f"choices and {next(iter(traced))}"):
        model.ask(VIDEO, QUESTION, choices=OPTIONS, frames=2, **traced)
