"""--quantize int8 answers token for token as transformers' `generate` with the same BitsAndBytesConfig.

LLM.int8 quantizes each activation row to int8 (and sends the columns past its outlier threshold through float16),
so a last-bit difference in what enters a layer becomes another rounding and, some tokens later, another answer:
identity needs the same bits in, which the pixels now are (transformers' order and precisions). Each width has an
init under which its answers vary (a random model can repeat one token whatever it is given); a second question on
the same loaded model checks that no state kept between calls changes an answer.
"""

import pytest
import torch

import videoqa
from conftest import asset, build_video_llava, needs_assets, reference_net, reference_pixels, reference_prompt
from videoqa.frames import read_frames

pytestmark = needs_assets
VIDEO = asset("videos/videollava_sample_demo_1.mp4")
SKIP = ["model.video_tower", "model.image_tower", "model.multi_modal_projector", "lm_head"]
SHAPES = {"prefill-heavy": (8, 6), "decode-heavy": (1, 40)}  # (frames, new tokens)
WIDTHS = {64: 0.1, 256: 0.02, 512: 0.05}  # hidden size: initializer range


@pytest.fixture(scope="module", params=WIDTHS, ids=lambda hidden: f"hidden{hidden}")
def pair(request, tmp_path_factory):
    """(videoqa's int8 model, transformers' int8 model, tokenizer) on one random checkpoint of that width."""
    from transformers import BitsAndBytesConfig, VideoLlavaForConditionalGeneration

    hidden = request.param
    path = build_video_llava(tmp_path_factory.mktemp(f"int8_{hidden}"), initializer_range=WIDTHS[hidden],
                             text=dict(hidden_size=hidden, intermediate_size=2 * hidden))
    bits = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP)
    reference = VideoLlavaForConditionalGeneration.from_pretrained(
        path, quantization_config=bits, device_map="cpu", dtype=torch.float32).eval()
    ours = videoqa.load(path, device="cpu", dtype="float32", quantize="int8", cache=False)
    return ours, reference, reference_net(path)[1]


def reference_answer(net, tokenizer, frames, question: str, new_tokens: int) -> list[int]:
    ids = torch.tensor([reference_prompt(net, tokenizer, frames, question)])
    out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                       pixel_values_videos=reference_pixels(net, list(frames.pixels))[None])
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_answers_equal_transformers(pair, shape):
    ours, reference, tokenizer = pair
    frames, new_tokens = SHAPES[shape]
    sampled = read_frames(VIDEO, frames)
    for question in ("Why is this video funny?", "What happens next, and who is there?"):  # one model, two calls
        answer = ours.ask(VIDEO, question, frames=frames, max_new_tokens=new_tokens)
        assert answer.runtime["quantize"] == "int8"
        expected = reference_answer(reference, tokenizer, sampled, question, new_tokens)
        assert answer.tokens == expected
        assert len(set(expected)) > 1  # an answer that varies: the comparison has teeth
