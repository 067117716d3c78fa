"""Qwen3-VL and SmolVLM2 through the paths the family-specific tests (tests/test_qwen3_vl.py, tests/test_smolvlm.py)
leave out, on the tiny checkpoints of tests/qwen_fixtures.py and tests/smolvlm_fixtures.py:

- the hub's file layout (config.json in the published shape, the weights in two shards with an index) loads
  through `videoqa ask -m DIR` and answers as the directly saved checkpoint does;
- the feature cache gives the same answer again, the features (and Qwen3-VL's DeepStack rows) read back from it;
- `--quantize nf4` keeps the vision side bit for bit and answers as transformers' `generate` under the same
  BitsAndBytesConfig;
- `find`'s score is sigmoid(logit(yes) - logit(no)) of transformers' forward on the same prompt;
- a `timeline` answers each segment as `ask` answers its window;
- the family's default frame rate is capped by a small context, said in a note, with the count worked out by hand.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import videoqa
from conftest import asset, needs_assets, reference_continue, save_tiny
from qwen_fixtures import build_qwen3_vl, chat_text
from smolvlm_fixtures import CORPUS, SPECIALS, build_smolvlm, build_tokenizer
from test_qwen2_5_vl import generated
from test_qwen3_vl import reference_rows
from test_smolvlm import processed_video
from videoqa.families import FIND, qwen3_vl, smolvlm
from videoqa.features import Visual

pytestmark = needs_assets
VIDEOS = [asset("videos/videollava_sample_demo_1.mp4"), asset("videos/videollava_sample_demo_3.mp4")]  # 640 x 360
QUESTION = "Why is this video funny?"
FAMILIES = ["qwen3_vl", "smolvlm"]


@pytest.fixture(scope="session")
def qwen3_vl_dir(tmp_path_factory):
    return build_qwen3_vl(tmp_path_factory.mktemp("new_qwen3_vl"))


@pytest.fixture(scope="session")
def smolvlm_dir(tmp_path_factory):
    return build_smolvlm(tmp_path_factory.mktemp("new_smolvlm"))


@pytest.fixture(scope="module")
def qwen3_vl_model(qwen3_vl_dir):
    return videoqa.load(qwen3_vl_dir, device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="module")
def smolvlm_model(smolvlm_dir):
    return videoqa.load(smolvlm_dir, device="cpu", dtype="float32", cache=False)


def reference(directory, **loading):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(directory, **loading).eval()


def checkpoint_and_model(request, family: str):
    return request.getfixturevalue(f"{family}_dir"), request.getfixturevalue(f"{family}_model")


# --- 1. the hub's layout -------------------------------------------------------------------------------------------

# config.json of Qwen/Qwen3-VL-2B-Instruct as published (/tmp/hubfacts.md 1.2: the fields, their nesting and names;
# M-RoPE in text_config's `rope_scaling` with `rope_theta` beside it, `tie_word_embeddings` at the top and in
# text_config, the tower's model_type "qwen3_vl")
QWEN3_VL_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 262144, "model_type": "qwen3_vl_text", "num_attention_heads": 16,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
    },
    "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024,
        "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096, "model_type": "qwen3_vl",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}

# config.json of HuggingFaceTB/SmolVLM2-256M-Video-Instruct as published (hubfacts 1.3: its essential keys, and the
# text model's `architectures` seen verbatim): no text_config bos/eos (LlamaConfig's defaults), the RoPE base in
# `rope_theta`, the top-level pad id outside the vocabulary (128002) as published
SMOLVLM2_256M = {
    "architectures": ["SmolVLMForConditionalGeneration"], "image_token_id": 49190, "model_type": "smolvlm",
    "pad_token_id": 128002, "scale_factor": 4, "tie_word_embeddings": False,
    "text_config": {
        "architectures": ["VLlama3ForCausalLM"], "model_type": "llama", "vocab_size": 49280, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000,
        "tie_word_embeddings": False, "pad_token_id": 2,
    },
    "vision_config": {
        "model_type": "smolvlm_vision", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "patch_size": 16, "image_size": 512,
    },
}

# The published files' weight names. Both were written under transformers' current layout, which 5.24 saves too
# (Qwen3-VL, 4.57: `model.language_model.*`, `model.visual.*`, no `lm_head.weight` for the tied 2B/4B; SmolVLM2:
# `model.text_model.*`, `model.vision_model.*`, `model.connector.modality_projection.proj.weight`, `lm_head.weight`):
# the hub layout is the saved names, sharded; no renaming as for Qwen2.5-VL's pre-4.52 names
HUB_NAMES = {"qwen3_vl": ("model.language_model.", "model.visual."),
             "smolvlm": ("model.text_model.", "model.vision_model.", "model.connector.", "lm_head.")}
# Kept as published, not the tiny checkpoint's: names of classes and versions (the tower's model_type "qwen3_vl"
# where 5.24 writes "qwen3_vl_vision"), and what the tiny config holds elsewhere (filled in below)
PUBLISHED = {"architectures", "model_type", "transformers_version", "dtype", "pad_token_id", "bos_token_id",
             "tie_word_embeddings", "rope_scaling", "rope_theta"}


def shaped(published: dict, tiny: dict) -> dict:
    """`published` with each value the tiny config has under the same key and nesting."""
    found = {}
    for key, value in published.items():
        if isinstance(value, dict) and isinstance(tiny.get(key), dict):
            found[key] = shaped(value, tiny[key])
        elif key in tiny and key not in ("architectures", "model_type", "transformers_version"):
            found[key] = tiny[key]
        else:
            assert key in PUBLISHED, key  # no dimension or token id of the real model is left over
            found[key] = value
    return found


def keys(config: dict) -> dict:
    return {k: keys(v) if isinstance(v, dict) else None for k, v in config.items()}


def hub_config(family: str, tiny: dict) -> dict:
    text = tiny["text_config"]
    rope = text["rope_parameters"]
    if family == "qwen3_vl":
        found = shaped(QWEN3_VL_2B, tiny)
        found["text_config"].update(
            bos_token_id=tiny["pad_token_id"],  # <|endoftext|>, the hub's 151643
            dtype="float32",  # the tiny weights' (the hub's are bfloat16)
            rope_scaling={"mrope_interleaved": rope["mrope_interleaved"], "mrope_section": rope["mrope_section"],
                          "rope_type": rope["rope_type"]},
            rope_theta=rope["rope_theta"], tie_word_embeddings=tiny["tie_word_embeddings"])
        assert keys(found) == keys(QWEN3_VL_2B)
    else:
        found = shaped(SMOLVLM2_256M, tiny)
        found["text_config"]["rope_theta"] = rope["rope_theta"]
        assert keys(found) == keys(SMOLVLM2_256M) and found["pad_token_id"] == tiny["_pad_token_id"]
    return found


def hub_layout(family: str, saved, directory):
    """The checkpoint as the hub publishes it: config.json in the published shape, the weights under the
    published names in two shards and model.safetensors.index.json, the other files (tokenizer, processor configs,
    chat template, generation config) copied."""
    from safetensors.torch import load_file, save_file

    directory.mkdir()
    tiny = json.loads((saved / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(hub_config(family, tiny), indent=2))
    weights = load_file(saved / "model.safetensors")
    assert all(name.startswith(HUB_NAMES[family]) for name in weights)
    names, index = sorted(weights), {}
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        file = f"model-0000{part}-of-00002.safetensors"
        save_file({name: weights[name].contiguous() for name in chunk}, directory / file, metadata={"format": "pt"})
        index.update({name: file for name in chunk})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    for file in saved.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy(file, directory / file.name)
    return directory


@pytest.mark.parametrize("family", FAMILIES)
def test_the_hub_layout_loads_through_m_dir(family, request, tmp_path, cli):
    saved, model = checkpoint_and_model(request, family)
    hub = hub_layout(family, saved, tmp_path / "hub")
    expected = model.ask(VIDEOS[0], QUESTION, frames=4, max_new_tokens=8)
    result = cli("ask", VIDEOS[0], QUESTION, "-m", hub, "--frames", "4", "-n", "8", "--json", "--device", "cpu",
                 "--dtype", "float32")
    assert result.code == 0, result.err
    assert json.loads(result.out)["tokens"] == expected.tokens
    assert len({*expected.tokens}) > 1  # not one token repeated: the comparison has teeth


# --- 2. the feature cache ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_the_feature_cache_gives_back_the_features_and_the_same_answer(family, request):
    saved, uncached = checkpoint_and_model(request, family)
    cached = videoqa.load(saved, device="cpu", dtype="float32")  # the cache dir is the test's own (conftest)
    first = cached.ask(VIDEOS[1], QUESTION, frames=4, max_new_tokens=8)
    again = cached.media(VIDEOS[1], frames=4)
    assert again.features is not None and again.frames.pixels is None  # read from the cache, nothing decoded
    assert cached.ask(again, QUESTION, max_new_tokens=8).tokens == first.tokens
    fresh = uncached.encode(uncached.media(VIDEOS[1], frames=4))
    assert torch.equal(again.features.rows, fresh.rows)
    assert len(again.features.layers) == len(fresh.layers) == (2 if family == "qwen3_vl" else 0)
    assert all(torch.equal(a, b) for a, b in zip(again.features.layers, fresh.layers))
    if family == "qwen3_vl":  # the DeepStack rows matter: zeroed, the answer changes
        zeroed = Visual(again.features.rows, again.features.grid,
                        tuple(torch.zeros_like(layer) for layer in again.features.layers), again.features.times)
        changed = cached.ask(dataclasses.replace(again, features=zeroed), QUESTION, max_new_tokens=8)
        assert changed.tokens != first.tokens


# --- 3. nf4 --------------------------------------------------------------------------------------------------------

def nf4(directory, family):
    """The checkpoint quantized by videoqa, and by transformers under the BitsAndBytesConfig videoqa should give it."""
    from transformers import BitsAndBytesConfig

    quantized = videoqa.load(directory, device="cpu", dtype="float32", quantize="nf4", cache=False)
    bits = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=[*family.vision_modules, "lm_head"])
    net = reference(directory, quantization_config=bits, device_map="cpu", dtype=torch.float32)
    return quantized, net


def assert_quantized_language_model_only(quantized, text_model: str):
    from bitsandbytes.nn import Linear4bit

    modules = dict(quantized.net.named_modules())
    assert isinstance(modules[f"{text_model}.layers.0.mlp.up_proj"], Linear4bit)
    assert not isinstance(modules["lm_head"], Linear4bit)
    vision = [m for name, m in modules.items() if name.startswith(quantized.family.vision_modules)]
    assert vision and not any(isinstance(m, Linear4bit) for m in vision)


def test_qwen3_vl_nf4_keeps_the_tower_and_equals_generate_under_the_same_config(qwen3_vl_dir, qwen3_vl_model):
    quantized, net = nf4(qwen3_vl_dir, qwen3_vl.FAMILY)
    assert_quantized_language_model_only(quantized, "model.language_model")
    media = quantized.media(VIDEOS[0], frames=4)
    assert torch.equal(quantized.features(media), qwen3_vl_model.features(media))  # model.visual is not quantized
    ours, theirs = quantized.encode(media), qwen3_vl_model.encode(media)
    assert all(torch.equal(a, b) for a, b in zip(ours.layers, theirs.layers, strict=True))  # nor DeepStack's mergers
    rows, inputs = reference_rows(qwen3_vl_dir, qwen3_vl_model, [media], [QUESTION])
    expected = generated(net, rows, 8, **inputs)[0]
    assert quantized.ask(media, QUESTION, max_new_tokens=8).tokens == expected
    assert expected != qwen3_vl_model.ask(media, QUESTION, max_new_tokens=8).tokens  # nf4 changed the answer


@pytest.fixture(scope="module")
def smolvlm_nf4_dir(smolvlm_dir, tmp_path_factory):
    """The tiny SmolVLM2 with a text model 128 wide (8 heads of 16): bitsandbytes' CPU 4-bit kernels need each
    linear layer's input width a multiple of its 64-element blocks, as the real ones are (576, 960, 2048); the
    fixture's 96 fails in them, in transformers as in videoqa."""
    from transformers import AutoTokenizer, SmolVLMConfig, SmolVLMForConditionalGeneration

    directory = tmp_path_factory.mktemp("smolvlm_nf4")
    config = SmolVLMConfig.from_pretrained(smolvlm_dir)
    config.text_config.hidden_size, config.text_config.num_attention_heads = 128, 8
    save_tiny(directory, SmolVLMForConditionalGeneration, config, AutoTokenizer.from_pretrained(smolvlm_dir), 0)
    for file in smolvlm_dir.iterdir():
        if not (directory / file.name).exists():  # the processor configs, chat template, generation config
            shutil.copy(file, directory / file.name)
    return directory


def test_smolvlm_nf4_keeps_the_tower_and_equals_generate_under_the_same_config(smolvlm_nf4_dir):
    quantized, net = nf4(smolvlm_nf4_dir, smolvlm.FAMILY)
    assert_quantized_language_model_only(quantized, "model.text_model")
    full = videoqa.load(smolvlm_nf4_dir, device="cpu", dtype="float32", cache=False)
    media = quantized.media(VIDEOS[0], frames=4)
    assert torch.equal(quantized.features(media), full.features(media))  # the tower and connector are kept
    inputs = processed_video(smolvlm_nf4_dir, VIDEOS[0], media.frames, QUESTION)
    expected = reference_continue(net, inputs.input_ids[0].tolist(), 8, pixel_values=inputs.pixel_values)
    assert quantized.ask(media, QUESTION, max_new_tokens=8).tokens == expected
    assert expected != full.ask(media, QUESTION, max_new_tokens=8).tokens  # nf4 changed the answer


# --- 4. find -------------------------------------------------------------------------------------------------------

def first_answer_id(tokenizer, prompt: str, word: str) -> int:
    """The id the answer `word` begins with after the whole `prompt`, as the tokenizer encodes the two together."""
    base = tokenizer(prompt, add_special_tokens=False).input_ids
    both = tokenizer(prompt + word, add_special_tokens=False).input_ids
    assert both[: len(base)] == base
    return both[len(base)]


def test_qwen3_vl_find_scores_yes_and_no_after_the_chatml_newline(qwen3_vl_dir, qwen3_vl_model):
    """ChatML's assistant turn ends in a newline: the answer is "Yes" or "No" without a leading space."""
    model, net = qwen3_vl_model, reference(qwen3_vl_dir)
    (found,) = model.find(VIDEOS[1], "a baby", count=1, frames=4)
    media = model.media(VIDEOS[1], frames=4)
    question = FIND.format(query="a baby")
    (ids,), inputs = reference_rows(qwen3_vl_dir, model, [media], [question])
    ids = torch.tensor([ids])
    with torch.inference_mode():
        logits = net(input_ids=ids, mm_token_type_ids=2 * (ids == net.config.video_token_id).int(),
                     **inputs).logits[0, -1]
    prompt = chat_text(qwen3_vl_dir, [(question, None)])
    assert prompt.endswith("<|im_start|>assistant\n")
    yes, no = (first_answer_id(model.tokenizer, prompt, word) for word in ("Yes", "No"))
    assert yes != no and (yes, no) == model.answer_ids
    expected = torch.sigmoid(logits[yes] - logits[no]).item()
    assert found["score"] == pytest.approx(expected, abs=1e-5)
    assert abs(expected - 0.5) > 1e-3  # the logits differ: the comparison has teeth


def answering_tokenizer():
    """smolvlm_fixtures' tokenizer (the same pre-tokeniser, special tokens, size and ids) trained on a corpus with
    answers in it too, so that " Yes" and " No" are one token each, as in SmolLM2's vocabulary ("ĠYes", "ĠNo"). The
    fixture's own BPE spells them "Ġ" "Y" "es" and "Ġ" "N" "o": both answers begin with "Ġ", which find refuses
    (tests/test_smolvlm.py)."""
    answers = ["Assistant: Yes", "Assistant: No", "Yes or no? Yes. No."]
    return build_tokenizer(CORPUS + answers * 2)


@pytest.fixture(scope="module")
def answering_smolvlm(smolvlm_dir, tmp_path_factory):
    """The tiny SmolVLM2 with answering_tokenizer: every special token keeps its id (the weights are the same)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("smolvlm_answering")
    shutil.copytree(smolvlm_dir, directory, dirs_exist_ok=True)
    tokenizer, old = answering_tokenizer(), AutoTokenizer.from_pretrained(smolvlm_dir)
    assert len(tokenizer) == len(old)
    assert tokenizer.convert_tokens_to_ids(list(SPECIALS)) == old.convert_tokens_to_ids(list(SPECIALS))
    tokenizer.save_pretrained(directory)
    return directory


def test_smolvlm_find_scores_yes_and_no_after_assistant_colon(answering_smolvlm):
    """SmolVLM2's turn ends in "Assistant:" with no space: the answer is " Yes" or " No"."""
    model = videoqa.load(answering_smolvlm, device="cpu", dtype="float32", cache=False)
    net = reference(answering_smolvlm)
    (found,) = model.find(VIDEOS[1], "a baby", count=1, frames=4)
    media = model.media(VIDEOS[1], frames=4)
    question = FIND.format(query="a baby")
    inputs = processed_video(answering_smolvlm, VIDEOS[1], media.frames, question)
    with torch.inference_mode():
        logits = net(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits[0, -1]
    prompt = model.tokenizer.decode(inputs.input_ids[0])
    assert prompt.endswith(f"{question}<end_of_utterance>\nAssistant:")
    yes, no = (first_answer_id(model.tokenizer, prompt, word) for word in (" Yes", " No"))
    assert model.tokenizer.convert_ids_to_tokens([yes, no]) == ["ĠYes", "ĠNo"]
    assert (yes, no) == model.answer_ids
    expected = torch.sigmoid(logits[yes] - logits[no]).item()
    assert found["score"] == pytest.approx(expected, abs=1e-5)
    assert abs(expected - 0.5) > 1e-3  # the logits differ: the comparison has teeth


# --- 5. timeline ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_a_timeline_answers_each_segment_as_ask_answers_its_window(family, request):
    _, model = checkpoint_and_model(request, family)
    records = list(model.timeline(VIDEOS[1], count=2, frames=2, max_new_tokens=6, batch_size=2))
    assert len(records) == 2 and records[0]["end"] == records[1]["start"]
    for record in records:
        alone = model.ask(VIDEOS[1], model.preset.describe, start=record["start"], end=record["end"], frames=2,
                          max_new_tokens=6)
        assert record["tokens"] == alone.tokens
    assert records[0]["tokens"] != records[1]["tokens"]  # the segments' answers differ: each saw its own frames


# --- 6. the context caps the default rate --------------------------------------------------------------------------

# videollava_sample_demo_1.mp4 is 9.72 s of 640 x 360 frames; the sampler leaves memory.TEXT = 64 positions of the
# context to the question and template, and takes the most frames whose video alone needs fewer than the rest.
#
# Qwen3-VL at its default 2 fps wants int(9.72 x 2) = 19 frames. With 154 positions, 90 are left. Frames become
# temporal patches of 2 (an odd count: the last repeated); each patch takes a `<t seconds>` (9 at most), vision
# start, h x w merged tokens, vision end. The fixture's video bound (65,536 px) holds for the whole clip:
# smart_resize scales 360 x 640 by beta = sqrt(n x 360 x 640 / 65536) and floors each side to a multiple of 32.
#   12 frames: beta = sqrt(42.19) = 6.50, 360 / 6.50 = 55 -> 32 px, 640 / 6.50 = 98 -> 96 px: 1 x 3 tokens;
#              6 patches x (9 + 1 + 3 + 1) = 84 < 90
#   13 frames: beta = 6.76, 53 -> 32, 95 -> 64: 1 x 2 tokens; 7 patches x 13 = 91 >= 90 (14 frames: the same 91;
#              15 on: 8 patches or more of at least 1 x 1 token, 12 positions each: 96 or more)
# so the context allows 12 (fewer frames can take more: 11 take 84 too, 9 take 85, as the sides floor by steps).
#
# SmolVLM2 at its default 1 fps wants int(9.72) = 9 frames. With 314 positions, 250 are left. A video takes per
# frame 4 rows + <fake><global-img>...<fake> (3) and "\nFrame from MM:SS:" counted by its 18 bytes, plus the intro
# " You are provided the following series of {words} frames from a 23:59:59 [H:MM:SS] video.\n" (83 bytes and the
# count in words; the duration's longest form) and the closing "\n\n" (2): 25 n + 85 + len(words(n)).
#   6 frames: 150 + 85 + len("six") = 238 < 250;  7 frames: 175 + 85 + len("seven") = 265 >= 250
# so the context allows 6.
CAPPED = {"qwen3_vl": (154, 2, 19, 12), "smolvlm": (314, 1, 9, 6)}  # context, fps, frames wanted, frames allowed


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_rate_is_capped_by_the_context(family, request, tmp_path, cli):
    saved, model = checkpoint_and_model(request, family)
    context, fps, wanted, allowed = CAPPED[family]
    assert model.preset.generation["fps"] == fps
    assert model.family.video.positions(model.net.config, allowed, (360, 640)) < context - 64
    assert model.family.video.positions(model.net.config, allowed + 1, (360, 640)) >= context - 64
    short = tmp_path / "short"
    shutil.copytree(saved, short)
    config = json.loads((short / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = context
    (short / "config.json").write_text(json.dumps(config))
    result = cli("ask", VIDEOS[0], QUESTION, "-m", short, "-n", "2", "--json", "--device", "cpu", "--dtype",
                 "float32", "--skip-memory-check")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    assert len(record["frames"]) == allowed < wanted
    assert f"9.7 s would take {wanted} frames; the model's context allows {allowed}" in result.err
    assert record["warnings"]
