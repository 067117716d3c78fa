"""Tiny random Qwen2.5-VL and Qwen3-VL checkpoints built offline with the real geometry, and transformers' own way
of prompting them.

The tokenizer is tests/onevision_fixtures' Qwen2-shaped BPE with the Qwen-VL special tokens in their real order
after `<|endoftext|>` (real ids 151643...; here V...: read them from the tokenizer):

    <|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|>
    <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|>

The geometry is the real one (14 px patches and window attention for Qwen2.5-VL, 16 px and DeepStack for Qwen3-VL;
two frames a temporal patch, 2 x 2 merge, M-RoPE sections in the real proportion); the widths are tiny, and the
preprocessor's pixel bounds are small so a frame takes a few tokens. The chat template is the hub's, verbatim.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import save_tiny

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
            "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>")

# chat_template.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct, verbatim
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Small pixel bounds, the real patch geometry: a 640 x 360 frame becomes 84 x 140 px, 3 x 5 merged tokens
QWEN2_5_VL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12544, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def build_qwen_tokenizer(directory: Path):
    from onevision_fixtures import build_tokenizer_qwen2

    tokenizer = build_tokenizer_qwen2(directory)
    tokenizer.add_tokens([t for t in SPECIALS if t not in tokenizer.get_vocab()], special_tokens=True)
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def ids_of(tokenizer) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in
            ("vision_start", "vision_end", "image_pad", "video_pad", "im_end", "endoftext")}


def build_qwen2_5_vl(directory: Path, seed: int = 0, *, init: float = 0.2, vocab_multiple: int = 1) -> Path:
    """A 2-layer Qwen2.5-VL: tower of 2 blocks (the second with full attention), 112 px attention windows."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen_tokenizer(directory)
    ids = ids_of(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=-(-len(tokenizer) // vocab_multiple) * vocab_multiple, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                         eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"], initializer_range=init),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1], tokens_per_second=2, initializer_range=init),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"],
        tie_word_embeddings=True, initializer_range=init,
    )
    save_tiny(directory, Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed)
    (directory / "preprocessor_config.json").write_text(json.dumps(QWEN2_5_VL_PREPROCESSOR))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}))
    return directory


# chat_template.json of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct, verbatim (no default system turn)
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# The hub's files with small pixel bounds, the real patch geometry: a 640 x 360 video of 4 frames becomes 96 x 160 px
# a frame (the bound holds for the whole clip), 3 x 5 merged tokens a temporal patch; a 1000 x 667 picture 96 x 128 px
QWEN3_VL_VIDEO_PREPROCESSOR = {
    "size": {"longest_edge": 65536, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}
QWEN3_VL_PREPROCESSOR = {
    "size": {"longest_edge": 16384, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}


def build_qwen3_vl(directory: Path, seed: int = 0, *, init: float = 0.2) -> Path:
    """A 3-layer Qwen3-VL: a tower of 3 blocks whose first two feed DeepStack (the first two decoder layers), an
    8 x 8 learned position grid, interleaved M-RoPE of head_dim 32 in sections [6, 5, 5] (the real [24, 20, 20] of
    128)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = build_qwen_tokenizer(directory)
    ids = ids_of(tokenizer)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5],
                                          "mrope_interleaved": True},
                         eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"], initializer_range=init),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1], initializer_range=init),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"],
        tie_word_embeddings=True, initializer_range=init,
    )
    save_tiny(directory, Qwen3VLForConditionalGeneration, config, tokenizer, seed)
    (directory / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_PREPROCESSOR))
    (directory / "video_preprocessor_config.json").write_text(json.dumps(QWEN3_VL_VIDEO_PREPROCESSOR))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}))
    return directory


def chat_text(directory: Path, turns: list[tuple[str, str | None]], medium: str = "video") -> str:
    """The checkpoint's chat template rendered as transformers renders it, for `turns` of (question, answer or None
    for the one to come); the media goes with the first question."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    template = json.loads((directory / "chat_template.json").read_text())["chat_template"]
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = ([{"type": medium}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def expanded_ids(directory: Path, text: str, grid, medium: str = "video") -> list[int]:
    """The processor's way (`Qwen2_5_VLProcessor.replace_*_token`): the pad repeated t*h*w / merge^2 times in the
    text, then the whole text tokenised."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    pad = f"<|{medium}_pad|>"
    text = text.replace(pad, pad * (int(grid.prod()) // 4), 1)
    return tokenizer(text, add_special_tokens=False).input_ids


def check_qwen_traced(answer, reference, ids: list[int], inputs: dict) -> None:
    """An answer of 4 tokens asked with logprobs=3, hidden_states=True, attentions=True against transformers'
    `generate` on the same rows (conftest.check_traced), the M-RoPE token types given as generate takes them."""
    import torch

    from conftest import check_traced, reference_traced

    row = torch.tensor(ids)
    types = ((row == reference.config.image_token_id).int() + 2 * (row == reference.config.video_token_id).int())
    out = reference_traced(reference, ids, 4, mm_token_type_ids=types[None], **inputs)
    check_traced(answer, out, len(ids), 3)
    assert answer.hidden_states.shape == (4, reference.config.text_config.num_hidden_layers + 1,
                                          reference.config.text_config.hidden_size)
    assert len(set(answer.tokens)) > 1  # not one token repeated: the comparison has teeth


def video_shares(answer, ids: list[int], placeholder: int, groups: int) -> list[float]:
    """The share of the answer's attention (mean over layers and heads, then over its tokens) that fell on the
    prompt's `placeholder` positions, from the answer's own attention weights: those positions in `groups` equal
    consecutive runs (a temporal patch, a frame), the share of each."""
    import torch

    where = [i for i, token in enumerate(ids) if token == placeholder]
    assert len(where) % groups == 0
    runs = [where[g * len(where) // groups: (g + 1) * len(where) // groups] for g in range(groups)]
    shares = torch.stack([weights.mean((0, 1))[: len(ids)] for weights in answer.attentions]).mean(0)
    return [float(shares[run].sum()) for run in runs]


def check_patch_shares(loaded, answer, ids: list[int], other, question: str) -> None:
    """`explain` on 4 frames (2 temporal patches): the frames' shares add up to the video's share of the attention,
    the two frames of a patch count its positions half each (so they get the same share), and other frames (the
    media `other`) get other shares."""
    import torch

    assert answer.timings["prefill_tokens"] == len(ids)
    shares = [frame["attention"] for frame in answer.frames]
    assert len(shares) == 4
    patches = video_shares(answer, ids, loaded.net.config.video_token_id, 2)  # each patch's own run of pads
    assert abs(sum(shares) - sum(patches)) < 1e-5
    assert shares[0] == shares[1] and shares[2] == shares[3] and shares[0] != shares[2]
    assert abs(shares[0] - patches[0] / 2) < 1e-5 and abs(shares[2] - patches[1] / 2) < 1e-5
    other = loaded.ask(other, question, max_new_tokens=4, explain=True)
    assert not torch.allclose(torch.tensor([f["attention"] for f in other.frames]), torch.tensor(shares))


def media_chat_text(directory: Path, turns: list[tuple[tuple[str, ...], str, str | None]]) -> str:
    """The checkpoint's chat template rendered as transformers renders it, for `turns` of (the kinds of the files
    the question comes with, in order, the question, its answer or None for the one to come): each user message's
    content [media..., text], as `chat_text` for one medium in the first turn."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    template = json.loads((directory / "chat_template.json").read_text())["chat_template"]
    messages = []
    for media, question, answer in turns:
        content = [{"type": medium} for medium in media] + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def qwen_image_inputs(directory: Path, image: Path) -> dict:
    """An image's pixels and grid as `generate` takes them: transformers' Qwen2VLImageProcessorPil under the
    checkpoint's preprocessor_config.json."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(**json.loads((directory / "preprocessor_config.json").read_text()))
    pixels = processor(Image.open(image).convert("RGB"), return_tensors="pt")
    return {"pixel_values": pixels.pixel_values, "image_grid_thw": pixels.image_grid_thw}


def repeat_pad(text: str, grid, medium: str) -> str:
    """The processor's way for one file (`replace_*_token`): its pad, the first left unexpanded, repeated
    t*h*w / merge^2 times."""
    pad = f"<|{medium}_pad|>"
    assert text.count(pad) == 1, text
    return text.replace(pad, pad * (int(grid.prod()) // 4), 1)


QUESTION_WITH_IMAGE = "Is the place in the photo in the video?"


def check_video_with_image(directory: Path, loaded, reference, video, image, *, inputs_of, ids_of, generate) -> None:
    """`ask clip.mp4 Q --with photo.jpg`: the video, then the image, each in its own vision span before the
    question, as the template renders content [video, image, text]; generate given both pixel inputs. `inputs_of`:
    a video Media's inputs of generate; `ids_of(text, media, videos, images)`: the text expanded the processor's
    way and tokenised; `generate`: the test file's `generated`."""
    media = loaded.media(video, frames=4)
    answer = loaded.ask([media, image], QUESTION_WITH_IMAGE, max_new_tokens=8)
    videos, images = inputs_of(loaded, media), qwen_image_inputs(directory, image)
    text = media_chat_text(directory, [(("video", "image"), QUESTION_WITH_IMAGE, None)])
    spans = "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
    assert spans + QUESTION_WITH_IMAGE in text
    ids = ids_of(text, media, videos, images)
    expected = generate(reference, [ids], 8, **videos, **images)[0]
    assert answer.tokens == expected
    assert answer.timings["prefill_tokens"] == len(ids)
    assert len(set(answer.tokens)) > 1  # not one token repeated: the comparison has teeth
    assert loaded.ask(media, QUESTION_WITH_IMAGE, max_new_tokens=8).tokens != expected  # the image counts


def check_image_then_video(directory: Path, loaded, reference, video, image, *, inputs_of, ids_of,
                           generate) -> None:
    """`chat photo.jpg`, a question, `/add clip.mp4`, a question about it: turn 1 is generate on the image alone;
    turn 2 is generate on the whole conversation (the second user turn's content [video, text]) given both pixel
    inputs, and only what follows turn 1's cached ids is prefilled. The keywords as `check_video_with_image`'s."""
    q1, q2 = "How many cats are there in the image?", "Why is this video funny?"
    media = loaded.media(video, frames=4)
    chat = loaded.chat(image)
    first = chat.ask(q1, max_new_tokens=6)
    chat.add(media)
    second = chat.ask(q2, max_new_tokens=6)
    videos, images = inputs_of(loaded, media), qwen_image_inputs(directory, image)
    ids = ids_of(media_chat_text(directory, [(("image",), q1, None)]), None, None, images)
    assert first.tokens == generate(reference, [ids], 6, **images)[0]
    # turn 2: turn 1's ids, its answer, then what the template writes after an answer and a question with a video
    both = media_chat_text(directory, [(("image",), q1, "ANSWER"), (("video",), q2, None)])
    after = both[both.index("ANSWER") + len("ANSWER"):].removeprefix("<|im_end|>")
    assert f"<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{q2}<|im_end|>" in after
    eos_id = loaded.tokenizer.eos_token_id
    eos = [] if first.tokens[-1] == eos_id else [eos_id]
    whole = ids + first.tokens + eos + ids_of(after, media, videos, None)
    expected = generate(reference, [whole], 6, **images, **videos)[0]
    assert second.tokens == expected
    assert len(set(expected)) > 1  # not one token repeated: the comparison has teeth
    # the cache held turn 1 (all but its last answer token): turn 2 prefilled only what follows
    assert second.timings["prefill_tokens"] == len(whole) - (len(ids) + len(first.tokens) - 1)
