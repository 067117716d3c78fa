"""A tiny random SmolVLM2 checkpoint built offline with the real geometry, and transformers' own processor for it.

The tokenizer is a byte-level BPE trained in-process and shaped like SmolLM2's (digits split one by one, then GPT-2's
byte-level pre-tokeniser; no BOS added), with SmolVLM2's special tokens in their real order (the hub's ids in
brackets; here read them from the tokenizer):

    <|endoftext|> (0)  <|im_start|> (1, BOS)  <|im_end|> (2, pad)  ...learned pieces...
    <global-img> (49152)  <row_1_col_1> ... <row_6_col_6> (49153-49188)  <fake_token_around_image> (49189)
    <image> (49190)  <end_of_utterance> (49279, EOS)

The geometry is the 256M's (16 px SigLIP patches, scale_factor 4, LANCZOS, images split into up to 4 x 4 tiles of
`max_image_size`) at a quarter of the size: 128 px tiles and frames, 8 x 8 patches, 4 rows each; images first go to
a 512 px longest edge. The widths are tiny, the init large so that answers follow the pixels. The chat template is
the hub's chat_template.json, verbatim.
"""

from __future__ import annotations

import contextlib
import copy
import json
import unittest.mock
from pathlib import Path

from conftest import save_tiny

ROWS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
SPECIALS = ("<global-img>", *ROWS, "<fake_token_around_image>", "<image>", "<end_of_utterance>")

# chat_template.json of HuggingFaceTB/SmolVLM2-{256M-Video,500M-Video,2.2B}-Instruct, verbatim
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# preprocessor_config.json: the hub's keys and values but the sizes (2048 -> 512, 512 -> 128)
PREPROCESSOR = {
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SmolVLMImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "max_image_size": {"longest_edge": 128}, "processor_class": "SmolVLMProcessor",
    "resample": 1, "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 512},
    "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 128}},
}
IMAGE_SEQ_LEN = 4  # processor_config.json's: (128 / 16)^2 / 4^2

# Words the BPE learns whole pieces from: the processor's video text, the prompts, numbers, and "\n\n" (one token
# alone, as in the real vocabulary; two before a word)
CORPUS = [
    "User: Assistant: You are provided the following series of frames from a [H:MM:SS] video.\n\nFrame from 00:00:",
    "one two three four five six seven eight nine ten eleven twelve thirteen twenty thirty forty hundred and thousand",
    "Why is this video funny? What is happening in the video? What is shown in this image? Describe this video.",
    "What happens next?\n\nWhat is the person in this video doing, and where?\n\n",
]


def build_tokenizer(corpus: list[str] = CORPUS):
    """A byte-level BPE shaped like SmolLM2's (digits one by one), learned from `corpus`, with the real special
    tokens in their real order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus * 20, trainer)
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", extra_special_tokens={
            "fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
            "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"})
    return tokenizer


def build_smolvlm(directory: Path, seed: int = 0, *, init: float = 0.3, vocab_multiple: int = 1) -> Path:
    """A 2-layer SmolVLM2 (Llama text model, untied head, 8192 positions) with a 2-layer SigLIP tower."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    tokenizer = build_tokenizer()
    ids = dict(zip(("bos", "eos", "pad", "image"), tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "<end_of_utterance>", "<|im_end|>", "<image>"])))
    config = SmolVLMConfig(
        text_config=dict(model_type="llama", vocab_size=-(-len(tokenizer) // vocab_multiple) * vocab_multiple,
                         hidden_size=96, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 1e5},
                         rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=ids["pad"],
                         bos_token_id=ids["bos"], eos_token_id=ids["eos"], initializer_range=init),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=16, image_size=128, initializer_range=init),
        scale_factor=4, image_token_id=ids["image"], tie_word_embeddings=False, initializer_range=init,
    )
    save_tiny(directory, SmolVLMForConditionalGeneration, config, tokenizer, seed)
    # generation_config.json as the hub's: EOS <end_of_utterance>, pad <|im_end|>
    generation = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": ids["eos"],
                  "pad_token_id": ids["pad"]}
    for name, content in (("generation_config.json", generation), ("preprocessor_config.json", PREPROCESSOR),
                          ("processor_config.json", {"image_seq_len": IMAGE_SEQ_LEN,
                                                     "processor_class": "SmolVLMProcessor"}),
                          ("chat_template.json", {"chat_template": CHAT_TEMPLATE})):
        (directory / name).write_text(json.dumps(content))
    return directory


@contextlib.contextmanager
def smolvlm_processor(directory: Path):
    """transformers' SmolVLMProcessor as the checkpoint makes it: its PIL image processor, its video processor (on
    the torchvision port: transformers' video processors need torchvision) and tokenizer, the hub's chat template.
    The processor's class check looks the video processor classes up in a registry that transformers, imported
    without torchvision, left empty: it is skipped here, and only here (as onevision_processor does)."""
    from torchvision_port import fake_torchvision
    from transformers.processing_utils import ProcessorMixin

    skip_check = unittest.mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *args: None)
    with fake_torchvision(), skip_check:
        from transformers import AutoTokenizer
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
        from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        settings = {k: v for k, v in PREPROCESSOR.items() if not k.endswith(("_type", "_class"))}
        yield SmolVLMProcessor(  # the video processor writes into the settings' video_sampling: a copy of them
            image_processor=SmolVLMImageProcessorPil(**settings), video_processor=SmolVLMVideoProcessor(
                **copy.deepcopy(settings)), tokenizer=AutoTokenizer.from_pretrained(directory),
            image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE)
