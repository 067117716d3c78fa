"""LLaVA-OneVision and LLaVA-1.5 visual features: ours equal transformers' get_video_features / get_image_features
(with their packing) exactly, in float32, on tiny random checkpoints; and transformers' own greedy `generate` runs on
those checkpoints from prompt ids built as its processors build them (the reference a later integration compares to)."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import asset, needs_assets, reference_continue
from onevision_fixtures import (
    QWEN2_SPECIALS,
    build_llava_15,
    build_llava_onevision,
    onevision_processor,
    onevision_video_tokens,
    reference_llava_15_prompt,
    reference_onevision_prompt,
)
from test_onevision_pixels import OV_PINPOINTS
from test_pixels import pictures
from videoqa.families.llava import image_features as llava_image
from videoqa.families.llava_onevision import image_features as anyres_max_image, pack_max
from videoqa.families.llava_onevision import video_features as onevision_video
from videoqa.frames import read_frames
from videoqa.pixels import anyres_max_pixels, best_resolution, clip_pixels, siglip_pixels

pytestmark = needs_assets  # the real pictures, and LLaVA-1.5's Llama-2 tokenizer


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    path = build_llava_onevision(tmp_path_factory.mktemp("onevision"))
    return LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def llava_15(tmp_path_factory):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    path = build_llava_15(tmp_path_factory.mktemp("llava15"))
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def frames(video: str, count: int = 8) -> np.ndarray:
    return siglip_pixels(read_frames(asset(f"videos/{video}"), count).pixels, 384)  # (count, 3, 384, 384)


def test_tiny_onevision_is_shaped_like_the_real_one(onevision):
    net, tokenizer = onevision
    config, vision = net.config, net.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == 729 and vision.model_type == "siglip_vision_model"
    assert config.image_grid_pinpoints == OV_PINPOINTS and config.vision_aspect_ratio == "anyres_max_9"
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    specials = tokenizer.convert_tokens_to_ids(list(QWEN2_SPECIALS))
    assert specials == list(range(specials[0], specials[0] + 5))  # the real order, shifted down from 151643
    assert (config.image_token_id, config.video_token_id) == tuple(specials[3:])
    assert tokenizer.eos_token_id == net.generation_config.eos_token_id == specials[2]  # <|im_end|>
    assert tokenizer.bos_token_id is None  # Qwen2 adds no BOS
    assert net.lm_head.weight.data_ptr() == net.model.language_model.embed_tokens.weight.data_ptr()  # tied, as 0.5B


def test_video_features_pool_to_196_per_frame_then_one_newline(onevision):
    net, _ = onevision
    pixels = frames("videollava_sample_demo_1.mp4")
    ours = onevision_video(net, pixels)
    assert ours.shape == (8 * 196 + 1, net.config.text_config.hidden_size) == (onevision_video_tokens(net, 8), 64)
    with torch.inference_mode():
        reference = net.model.get_video_features(pixel_values_videos=torch.from_numpy(pixels)[None]).pooler_output
    assert torch.equal(ours, reference[0])
    assert torch.equal(ours[-1], net.model.image_newline.detach())


@pytest.mark.parametrize("name", ["landscape 1000x667", "portrait 576x1024", "small 300x168", "tall strip 200x667"])
def test_image_features_equal_transformers_and_the_processor_count(onevision, name):
    net, tokenizer = onevision
    picture = pictures()[name]
    ours = anyres_max_image(net, picture)
    inputs = onevision_processor(tokenizer, net.config.image_grid_pinpoints)(
        text="<|im_start|>user <image>\nWhat?<|im_end|>", images=picture, return_tensors="pt")
    assert len(ours) == (inputs.input_ids == net.config.image_token_id).sum()  # the processor's placeholder count
    pixels = torch.from_numpy(anyres_max_pixels(picture, 384, net.config.image_grid_pinpoints))[None]  # our tiles:
    with torch.inference_mode():  # the processor's differ in the last float bits (test_onevision_pixels)
        reference = net.model.get_image_features(pixel_values=pixels, image_sizes=inputs.image_sizes)
    assert torch.equal(ours, reference.pooler_output[0])


def test_a_large_image_is_shrunk_to_about_nine_tiles(onevision):
    net, _ = onevision
    picture = Image.fromarray(read_frames(asset("videos/videollava_assets_demo.mp4"), 1).pixels[0])  # 2048x1810
    ours = anyres_max_image(net, picture)
    # 5 x 6 tiles: a 135 x 162 feature grid, unpadded to 135 x 152, is sqrt(135 * 152 / (9 * 27^2)) = 1.77 times
    # too big for anyres_max_9, so shrunk to 76 x 85; one newline per row, after the 729 base-tile rows
    assert ours.shape == (729 + 76 * (85 + 1), 64)
    pixels = torch.from_numpy(anyres_max_pixels(picture, 384, net.config.image_grid_pinpoints))[None]
    with torch.inference_mode():
        reference = net.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[1810, 2048]]))
    assert torch.equal(ours, reference.pooler_output[0])


# (height, width): landscape, portrait, square, strips, a sliver, odd sizes, and grids from 1x1 to 6x6 tiles
SIZES = [(667, 1000), (1024, 576), (225, 225), (300, 1000), (667, 200), (400, 13), (479, 641), (1001, 333),
         (1810, 2048), (2304, 2304), (3000, 500), (384, 2304), (1200, 1250)]


@pytest.mark.parametrize("size", SIZES)
def test_pack_max_equals_transformers_and_the_processor_count(onevision, size):
    net, tokenizer = onevision
    grid_height, grid_width = best_resolution(size, net.config.image_grid_pinpoints)
    count = 1 + (grid_height // 384) * (grid_width // 384)
    tiles = torch.randn(count, 729, 64, generator=torch.Generator().manual_seed(0))  # (base + grid tiles, T, D)
    model = net.model
    reference, _ = model.pack_image_features([tiles], torch.tensor([size]), model.image_newline, "anyres_max_9")
    ours = pack_max(net, tiles, size)
    assert torch.equal(ours, reference[0])
    processor = onevision_processor(tokenizer, net.config.image_grid_pinpoints)
    assert len(ours) == processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens[0]


def test_llava_15_image_features_drop_cls_576(llava_15):
    net, _ = llava_15
    picture = Image.open(asset("images/videollava_desert.jpg")).convert("RGB")
    ours = llava_image(net, picture)
    assert ours.shape == (576, net.config.text_config.hidden_size)
    with torch.inference_mode():
        reference = net.model.get_image_features(pixel_values=torch.from_numpy(clip_pixels([picture], 336)))
    assert torch.equal(ours, reference.pooler_output[0])


def test_onevision_video_prompt_follows_the_chat_template(onevision):
    net, tokenizer = onevision
    processor = onevision_processor(tokenizer, net.config.image_grid_pinpoints)
    turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why is this video funny?"}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user <video>\nWhy is this video funny?<|im_end|><|im_start|>assistant\n"
    ids = reference_onevision_prompt(tokenizer, "Why is this video funny?", "<video>", 3)
    assert ids == tokenizer(text.replace("<video>", "<video>" * 3)).input_ids  # no BOS from Qwen2's tokenizer


def test_onevision_generate_on_video_depends_on_the_frames(onevision):
    net, tokenizer = onevision
    ids = reference_onevision_prompt(tokenizer, "Why is this video funny?", "<video>", onevision_video_tokens(net, 8))
    answers = [reference_continue(net, ids, 8, pixel_values_videos=torch.from_numpy(frames(video))[None])
               for video in ("videollava_sample_demo_1.mp4", "videollava_sample_demo_9.mp4")]
    assert all(len(answer) == 8 or answer[-1] == tokenizer.eos_token_id for answer in answers)
    assert answers[0] != answers[1]


def test_onevision_generate_on_image_through_the_processor(onevision):
    net, tokenizer = onevision
    picture = pictures()["landscape 1000x667"]
    processor = onevision_processor(tokenizer, net.config.image_grid_pinpoints)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    inputs = processor(text=processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False),
                       images=picture, return_tensors="pt")
    count = len(anyres_max_image(net, picture))
    ids = reference_onevision_prompt(tokenizer, "What is shown in this image?", "<image>", count)
    assert inputs.input_ids[0].tolist() == ids
    answer = reference_continue(net, ids, 8, pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes)
    other = reference_continue(net, ids, 8, pixel_values=inputs.pixel_values.flip(-1), image_sizes=inputs.image_sizes)
    assert len(answer) == 8 and answer != other


def test_llava_15_generate_through_the_processor_path(llava_15):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor

    net, tokenizer = llava_15
    picture = Image.open(asset("images/videollava_desert.jpg")).convert("RGB")
    images = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    inputs = processor(text="USER: <image>\nWhat is shown in this image? ASSISTANT:", images=picture,
                       return_tensors="pt")
    ids = reference_llava_15_prompt(tokenizer, "What is shown in this image?")
    assert inputs.input_ids[0].tolist() == ids and ids.count(32000) == 576
    answer = reference_continue(net, ids, 8, pixel_values=torch.from_numpy(clip_pixels([picture], 336)))
    other = reference_continue(net, ids, 8, pixel_values=torch.from_numpy(clip_pixels([picture.rotate(90)], 336)))
    assert len(answer) == 8 and answer != other
