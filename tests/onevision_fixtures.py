"""Tiny random LLaVA-OneVision and LLaVA-1.5 checkpoints built offline, and transformers' own way of prompting them.

No real Qwen2 tokenizer is available offline, so `build_tokenizer_qwen2` trains a byte-level BPE in-process with the
tokenizers library, with Qwen2's normaliser, pre-tokeniser and decoder, wrapped in transformers' `Qwen2Tokenizer`.
Its special tokens come in the real order, right after the ~350 learned pieces instead of at 151643:

    real (llava-onevision-qwen2-*-ov-hf)        tiny (here)
    <|endoftext|> 151643  (BOS in generation)   QWEN2_SPECIALS[0] = V
    <|im_start|>  151644                        V + 1
    <|im_end|>    151645  (EOS)                 V + 2
    <image>       151646                        V + 3
    <video>       151647                        V + 4

where V = the number of learned pieces (read it from the tokenizer, never assume it).
"""

from __future__ import annotations

import json
import unittest.mock
from pathlib import Path

from conftest import build_tokenizer, save_tiny, tiny_text, tiny_vision

QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# chat_template.json of llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf (the 826-byte version, Aug 2024), verbatim
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Enough words for the BPE to learn whole pieces for the prompts the tests use.
CORPUS = [
    "system user assistant",
    "Why is this video funny? What is happening in the video? What is shown in this image?",
    "Describe the picture in detail. Why? What happens next? Is there a dog?",
    "The video is funny because the baby is sitting on the bed and reading a book, which is an unusual sight.",
]


def build_tokenizer_qwen2(directory: Path):
    """A byte-level BPE shaped like Qwen2's, with Qwen2's special tokens in their real order (see the module doc);
    EOS <|im_end|>, pad <|endoftext|>, no BOS added, as the real tokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(CORPUS * 20, trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge) for merge in learned["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=learned["vocab"], merges=merges)  # adds <|endoftext|> after the learned pieces
    tokenizer.add_tokens(list(QWEN2_SPECIALS[1:]), special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_siglip(image_size: int = 384):
    """A 2-layer SigLIP tower with the real 384 px / 14 px geometry: 27 x 27 = 729 patches, no CLS, no head."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, vision_use_head=False)


def tiny_qwen2(tokenizer, **extra):
    """A 2-layer Qwen2 with Qwen2-0.5B's shape where it counts: grouped KV heads, RoPE theta 1e6, 32k positions,
    tied embeddings, vocabulary padded past the tokenizer (as 151936 > 151648)."""
    from transformers import Qwen2Config

    ids = tokenizer.convert_tokens_to_ids(list(QWEN2_SPECIALS))
    return Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True, bos_token_id=ids[0], eos_token_id=ids[2], **extra,
    )


def build_llava_onevision(directory: Path, seed: int = 0) -> Path:
    """A random-weight LLaVA-OneVision shaped like llava-onevision-qwen2-0.5b-ov-hf: SigLIP 384 px (196 pooled tokens
    per frame), last hidden layer, "full" strategy, the 36 grid pinpoints and anyres_max_9. The text model's large
    init (0.3) makes a greedy answer depend visibly on the pixels."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    tokenizer = build_tokenizer_qwen2(directory)
    config = LlavaOnevisionConfig(
        vision_config=tiny_siglip(), text_config=tiny_qwen2(tokenizer, initializer_range=0.3),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    return save_tiny(directory, LlavaOnevisionForConditionalGeneration, config, tokenizer, seed)


def build_llava_15(directory: Path, seed: int = 0) -> Path:
    """A random-weight LLaVA-1.5 shaped like llava-1.5-7b-hf: CLIP 336 px (576 patches, CLS dropped, layer -2), the
    real Llama-2 tokenizer with <image> = 32000 and <pad> = 32001, vocabulary 32064, 4096 positions."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tokenizer(directory, ("<image>", "<pad>"))
    config = LlavaConfig(vision_config=tiny_vision(336), text_config=tiny_text(4096, 32001, initializer_range=0.3),
                         image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return save_tiny(directory, LlavaForConditionalGeneration, config, tokenizer, seed)


def onevision_processor(tokenizer, pinpoints: list[list[int]]):
    """transformers' LlavaOnevisionProcessor for images, with the hub's processor settings (729 tokens per tile,
    "full", mean/std 0.5) and no video processor: without torchvision, the processor's class check fails while
    looking the (absent) video processor classes up, so that check is skipped here, and only here."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    images = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3, image_grid_pinpoints=pinpoints)
    with unittest.mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *args: None):
        return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                       num_image_tokens=729, vision_feature_select_strategy="full",
                                       chat_template=ONEVISION_CHAT_TEMPLATE)


def onevision_video_tokens(net, frames: int) -> int:
    """As LlavaOnevisionProcessor.replace_video_token counts: ceil(side / 2)^2 per frame, plus one image_newline."""
    vision = net.config.vision_config
    pooled = -(-(vision.image_size // vision.patch_size) // 2)
    return frames * pooled * pooled + 1


def reference_onevision_prompt(tokenizer, question: str, placeholder: str, count: int) -> list[int]:
    """The ids LlavaOnevisionProcessor gives for one user turn rendered by the checkpoint's chat template with
    add_generation_prompt: `<|im_start|>user <video>\\n{question}<|im_end|><|im_start|>assistant\\n`, the placeholder
    repeated `count` times before tokenising (the processor's way); no BOS (Qwen2 adds none)."""
    text = f"<|im_start|>user {placeholder * count}\n{question}<|im_end|><|im_start|>assistant\n"
    return tokenizer(text, add_special_tokens=False).input_ids


def reference_llava_15_prompt(tokenizer, question: str, count: int = 576) -> list[int]:
    """llava-1.5-7b-hf's chat template for one user turn with an image, generation prompt added:
    `USER: <image>\\n{question} ASSISTANT:`, <image> repeated `count` times, BOS first."""
    text = "USER: " + "<image>" * count + f"\n{question} ASSISTANT:"
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]


def siglip_reference_pixels(net, images):
    """transformers' SiglipImageProcessorPil with the OneVision checkpoints' settings (squash to the tower's size,
    bicubic, mean = std = 0.5): frames as transformers' video processor would make them, without torchvision."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size = net.config.vision_config.image_size
    processor = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3, resample=3)
    return processor(images, return_tensors="pt").pixel_values
