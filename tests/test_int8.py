"""--quantize int8 and int4 on the CPU answer token for token as transformers' `generate` with the model loaded through
the same torchao config (transformers' TorchAoConfig: Int8WeightOnlyConfig per row, PrototypeInt4WeightOnlyConfig
in groups), the vision side unquantized; a tied LM head is quantized as an untied copy with the same config, which
the reference gets through torchao's own `quantize_`.

Each width has an init under which its answers vary (a random model can repeat one token whatever it is given); a
second question on the same loaded model checks that no state kept between calls changes an answer.
"""

import json

import pytest
import torch

import videoqa
from conftest import asset, build_video_llava, needs_assets, reference_net, reference_pixels, reference_prompt
from conftest import reference_continue, reference_torchao
from onevision_fixtures import build_llava_onevision, onevision_video_tokens, reference_onevision_prompt
from onevision_fixtures import siglip_reference_pixels
from videoqa.frames import read_frames

pytestmark = needs_assets
VIDEO = asset("videos/videollava_sample_demo_1.mp4")
SHAPES = {"prefill-heavy": (8, 6), "decode-heavy": (1, 40)}  # (frames, new tokens)
WIDTHS = {64: 0.1, 256: 0.02, 512: 0.05}  # hidden size: initializer range
QUESTIONS = ("Why is this video funny?", "What happens next, and who is there?")


@pytest.fixture(scope="module", params=WIDTHS, ids=lambda hidden: f"hidden{hidden}")
def video_llava(request, tmp_path_factory):
    hidden = request.param
    return build_video_llava(tmp_path_factory.mktemp(f"quantized_{hidden}"), initializer_range=WIDTHS[hidden],
                             text=dict(hidden_size=hidden, intermediate_size=2 * hidden))


def generate(net, ids: list[int], new_tokens: int, **pixels) -> list[int]:
    """transformers' greedy `generate` over a static cache of videoqa's capacity (the prompt and answer rounded up
    to 256): in bfloat16, attention's sums round differently over another number of cached positions, so a
    dynamic cache can part from any static one some tokens in."""
    from transformers import StaticCache

    ids = torch.tensor([ids])
    cache = StaticCache(config=net.config.text_config, max_cache_len=-(-(ids.shape[1] + new_tokens) // 256) * 256)
    out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                       cache=cache, **{k: v.to(torch.bfloat16) for k, v in pixels.items()})
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_answers_equal_transformers(video_llava, quantize, shape):
    group = 128 if text_config(video_llava)["hidden_size"] % 128 == 0 else 64  # the largest that divides the widths
    ours = videoqa.load(video_llava, device="cpu", quantize=quantize, cache=False)
    assert ours.net.dtype == torch.bfloat16  # --dtype auto with int8/int4 on a CPU
    skip = ["model.video_tower", "model.image_tower", "model.multi_modal_projector"]
    reference, tokenizer = reference_torchao(video_llava, quantize, skip, group), reference_net(video_llava)[1]
    frames, new_tokens = SHAPES[shape]
    sampled = read_frames(VIDEO, frames)
    for question in QUESTIONS:  # one model, two calls
        answer = ours.ask(VIDEO, question, frames=frames, max_new_tokens=new_tokens)
        assert answer.runtime == {"device": "cpu", "dtype": "bfloat16", "quantize": quantize}
        ids = reference_prompt(reference, tokenizer, sampled, question)
        expected = generate(reference, ids, new_tokens,
                            pixel_values_videos=reference_pixels(reference, list(sampled.pixels))[None])
        assert answer.tokens == expected
        assert len(set(expected)) > 1  # an answer that varies: the comparison has teeth


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_in_float32_answers_equal_transformers_own_generate(video_llava, quantize):
    """In float32 the quantized layers are torchao's own tensors: the answer is transformers' `generate` with the
    same TorchAoConfig and its default (dynamic) cache."""
    group = 128 if text_config(video_llava)["hidden_size"] % 128 == 0 else 64
    ours = videoqa.load(video_llava, device="cpu", dtype="float32", quantize=quantize, cache=False)
    skip = ["model.video_tower", "model.image_tower", "model.multi_modal_projector"]
    reference = reference_torchao(video_llava, quantize, skip, group, torch.float32)
    sampled = read_frames(VIDEO, 1)
    ids = reference_prompt(reference, reference_net(video_llava)[1], sampled, QUESTIONS[0])
    expected = reference_continue(reference, ids, 30,
                                  pixel_values_videos=reference_pixels(reference, list(sampled.pixels))[None])
    assert ours.ask(VIDEO, QUESTIONS[0], frames=1, max_new_tokens=30).tokens == expected
    assert len(set(expected)) > 1


def text_config(path) -> dict:
    return json.loads((path / "config.json").read_text())["text_config"]


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return build_llava_onevision(tmp_path_factory.mktemp("onevision_quantized"))


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_tied_head_is_quantized_as_transformers_would_quantize_it(onevision, quantize):
    """LLaVA-OneVision's Qwen2 ties its LM head to the embeddings: the head is quantized as a copy, the embeddings
    stay in bfloat16 (the embedding lookup of a prompt's text is unchanged)."""
    ours = videoqa.load(onevision, device="cpu", quantize=quantize, cache=False)
    assert ours.net.get_input_embeddings().weight.dtype == torch.bfloat16
    embeddings = ours.net.get_input_embeddings().weight
    assert held_bytes(ours.net.lm_head) < 0.6 * embeddings.numel() * 2  # a quantized copy, not the bfloat16 matrix
    reference = reference_torchao(onevision, quantize, ["model.vision_tower", "model.multi_modal_projector"], 64)
    tokenizer = reference_net(onevision)[1]
    frames = read_frames(VIDEO, 2)
    ids = reference_onevision_prompt(tokenizer, QUESTIONS[0], "<video>", onevision_video_tokens(reference, 2))
    expected = generate(reference, ids, 30, pixel_values_videos=siglip_reference_pixels(reference, list(frames.pixels))[None])
    assert ours.ask(VIDEO, QUESTIONS[0], frames=2, max_new_tokens=30).tokens == expected
    assert len(set(expected)) > 1


def held_bytes(module) -> int:
    """Bytes of a module's tensors, a torchao tensor's by its parts (its int8 or packed int4 data, scales, zeros)."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        parts = [getattr(tensor, name) for name in getattr(tensor, "tensor_data_names", [])] or [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_the_estimate_counts_the_quantized_weights(onevision, quantize):
    """The memory check's weights against the bytes the loaded model holds (a tied head's quantized copy too)."""
    from videoqa.session import Checkpoint

    found = Checkpoint(onevision, device="cpu", dtype="bfloat16", quantize=quantize, cache=False, check_memory=False)
    estimate = found.estimate(frames=2)
    held = held_bytes(found.load().net)
    assert abs(estimate.weights - held) <= 0.15 * held, (estimate.weights, held)


@pytest.mark.parametrize("quantize, share", [("int8", 0.6), ("int4", 0.4)])
def test_quantized_layers_weigh_less_than_bfloat16(video_llava, quantize, share):
    def layers(quantize):
        net = videoqa.load(video_llava, device="cpu", dtype="bfloat16", quantize=quantize, cache=False).net
        return held_bytes(net.model.language_model.layers) + held_bytes(net.lm_head)

    assert layers(quantize) < share * layers("none")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_plain_modules_compute_what_torchaos_tensors_compute(quantize):
    """Int8Linear and Int4Linear against torchao's own linear on the same quantized weight, with a bias: bit for bit
    at one row (a decode step) and past 16 rows (a prefill), for 2-D and 3-D inputs."""
    from torchao.quantization import quantize_

    from videoqa.quantization import Int4Linear, Int8Linear, torchao_config
    from transformers import LlamaConfig

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True, dtype=torch.bfloat16)
    text = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, vocab_size=96)
    quantize_(linear, torchao_config(quantize, text))
    plain = (Int8Linear if quantize == "int8" else Int4Linear)(linear)
    with torch.inference_mode():
        for shape in [(1, 256), (1, 1, 256), (40, 256), (2, 17, 256)]:
            x = torch.randn(shape, dtype=torch.bfloat16)
            assert torch.equal(plain(x), linear(x)), shape
