"""SmolVLM2 (`smolvlm`): a SigLIP tower (16 px patches at 512 px; the 2.2B 14 px at 384) whose last hidden state the
connector pixel-shuffles (scale_factor^2 patches into one) and projects: 64 rows a frame or tile (the 2.2B 81), as
`get_image_features` makes them; a Llama text model with 1-D positions. Videos and images both go over `<image>`.

The prompt is what transformers 5.24's `SmolVLMProcessor` writes. One user turn, after the tokenizer's BOS (which is
the `<|im_start|>` the chat templates begin with): `User:{media}{question}<end_of_utterance>\\nAssistant:`, later turns
`\\nUser: {question}<end_of_utterance>\\nAssistant:` after `{answer}<end_of_utterance>`. For a video the processor
swaps in its own chat template (the hub's drops videos), which writes `User: ` before the media, so the space opens
the video's expansion; an image's `User:` has none, and several media follow each other with nothing between them, in
the order given (a video after another file without the space). A video's expansion: ` You are provided the following series of
{count in words} frames from a {H:MM:SS} [H:MM:SS] video.\\n`, then per frame `\\nFrame from {MM:SS}:` and
`<fake_token_around_image><global-img>` + `<image>` x 64 + `<fake_token_around_image>`, then `\\n\\n`. An image split
into rows x cols tiles: per tile `<fake_token_around_image><row_{r}_col_{c}>` + `<image>` x 64, `\\n` after each row,
then `\\n` and the global image as a frame's; an unsplit image the global image alone.

The expansion is text, written in the template and tokenised with the question, as the processor tokenises it: the
`\\n\\n` after the last frame merges with what follows. The video's duration is the last frame's second (the
processor's own fallback when it is given frames without one; given a file it reads the container's).
"""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import torch
from PIL import Image

from videoqa.decode import LanguageModel
from videoqa.families.base import Family, Videos
from videoqa.features import Visual, patches_per_side
from videoqa.pixels import SMOLVLM_MAX_SIDE, smolvlm_image_pixels, smolvlm_video_pixels

TEMPLATE = "User:{media}{question}<end_of_utterance>\nAssistant:"  # after the BOS, <|im_start|>
FOLLOWUP = "\nUser: {question}<end_of_utterance>\nAssistant:"  # after `{a1}<end_of_utterance>`
FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"
INTRO = " You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
FRAME = "\nFrame from {minutes:02d}:{seconds:02d}:"
OUTRO = "\n\n"
# SmolVLMImageProcessor's and SmolVLMVideoProcessor's defaults, under what the preprocessor config gives
DEFAULTS = {"size": {"longest_edge": 4 * 364}, "max_image_size": {"longest_edge": 364}, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "resample": 1, "do_image_splitting": True}
FPS, MAX_FRAMES = 1.0, 64  # the hub checkpoints' video_sampling
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(number: int) -> str:
    """`number` (under a million) in English words as num2words writes it: "sixty-four", "one hundred and one",
    "one thousand, two hundred and five"."""
    if number >= 1000:
        thousands, rest = divmod(number, 1000)
        tail = "" if rest == 0 else f" and {words(rest)}" if rest < 100 else f", {words(rest)}"
        return f"{words(thousands)} thousand{tail}"
    if number >= 100:
        hundreds, rest = divmod(number, 100)
        return f"{ONES[hundreds]} hundred" + (f" and {words(rest)}" if rest else "")
    if number >= 20:
        tens, rest = divmod(number, 10)
        return TENS[tens] + (f"-{ONES[rest]}" if rest else "")
    return ONES[number]


def image_seq_len(config) -> int:
    """Rows a frame or tile takes after the pixel shuffle: (512 / 16)^2 / 4^2 = 64."""
    return patches_per_side(config) ** 2 // config.scale_factor**2


def bounds(config, kind: str) -> dict:
    """smolvlm_*_pixels' keywords from the checkpoint's `kind` preprocessor settings. A video's first resize is to
    `size` where the file has one, over video_sampling's video_size (as SmolVLMVideoProcessor reads them)."""
    given = config.preprocessing[kind]
    found = {**DEFAULTS, **given}
    sampled = given.get("video_sampling", {}).get("video_size") if kind == "video" else None
    size = given.get("size") or sampled or DEFAULTS["size"]
    return dict(size=size["longest_edge"], max_image_size=found["max_image_size"]["longest_edge"],
                image_mean=found["image_mean"], image_std=found["image_std"], resample=found["resample"])


def video_pixels(config, frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> (N, 3, S, S), frame-major as the other families hand them."""
    return smolvlm_video_pixels(frames, **bounds(config, "video"))[0]


@torch.inference_mode()
def tower(net, pixels: torch.Tensor) -> torch.Tensor:
    """(1, N, 3, S, S) frames or tiles -> (N * 64, D): `get_image_features`, what the model splices."""
    return net.model.get_image_features(pixels.to(net.device)).pooler_output[0]


def video_features(net, pixels: torch.Tensor) -> torch.Tensor:
    return tower(net, pixels[None])


def image_features(net, image: Image.Image) -> Visual:
    """The tiles and the global image through the tower; the split (1, rows, cols) as the grid, for the prompt."""
    splitting = {**DEFAULTS, **net.config.preprocessing["image"]}["do_image_splitting"]
    pixels, (rows, cols) = smolvlm_image_pixels(image, **bounds(net.config, "image"), do_image_splitting=splitting)
    return Visual(tower(net, pixels), grid=torch.tensor([[1, rows, cols]]))


def single(image: str, per: int) -> str:
    """A frame or the global image: `<fake_token_around_image><global-img>`, its rows, `<fake_token_around_image>`."""
    return f"{FAKE}{GLOBAL}{image * per}{FAKE}"


def video_text(image: str, per: int, times: tuple[float, ...]) -> str:
    intro = INTRO.format(count=words(len(times)), duration=timedelta(seconds=int(times[-1])))
    stamps = (FRAME.format(minutes=int(t // 60), seconds=int(t % 60)) for t in times)
    return intro + "".join(stamp + single(image, per) for stamp in stamps) + OUTRO


def image_text(image: str, per: int, rows: int, cols: int) -> str:
    if rows == cols == 0:
        return single(image, per)
    tiles = ("".join(f"{FAKE}<row_{r}_col_{c}>{image * per}" for c in range(1, cols + 1)) + "\n"
             for r in range(1, rows + 1))
    return "".join(tiles) + "\n" + single(image, per)


def media_text(media: list[tuple[bool, str]]) -> str:
    """A turn's media texts one after the other; the space of `User: ` opens a video's only when it opens the turn."""
    return "".join(text if n == 0 or not video else text.removeprefix(" ") for n, (video, text) in enumerate(media))


def expand(tokenizer, placeholder: str, visual: Visual) -> str:
    """The media's text, written in the template and tokenised with the question, as the processor does (its
    closing blank line merges with what follows)."""
    if visual.times:
        return video_text(placeholder, visual.rows.shape[0] // len(visual.times), visual.times)
    _, rows, cols = visual.grid[0].tolist()
    return image_text(placeholder, visual.rows.shape[0] // (rows * cols + 1), rows, cols)


def video_positions(config, frames: int, size: tuple[int, int] | None = None) -> int:
    """Positions the video's expansion takes, at most: its special tokens and rows exactly, its text by its bytes
    (a byte-level BPE token holds one at least); timestamps under 100 minutes, a duration under a day."""
    text = INTRO.format(count=words(frames), duration="23:59:59") + FRAME.format(minutes=0, seconds=0) * frames + OUTRO
    return frames * (image_seq_len(config) + 3) + len(text.encode())


def largest_image(config) -> tuple[int, int]:
    """(tiles, positions) of the largest image: its longest edge is always resized to `size`, so a square one is
    split the most, side x side tiles and the global image; its newlines counted as tokens."""
    found, per = {**DEFAULTS, **config.preprocessing["image"]}, image_seq_len(config)
    if not found["do_image_splitting"]:
        return 1, per + 3
    image = bounds(config, "image")
    side = math.ceil(min(image["size"], SMOLVLM_MAX_SIDE) / image["max_image_size"])
    return side * side + 1, side * side * (per + 2) + side + 1 + per + 3


FAMILY = Family(
    "smolvlm", "SmolVLMForConditionalGeneration", image_features, largest_image,
    template=TEMPLATE, followup=FOLLOWUP, followup_media="\n" + TEMPLATE, images_first=False, media_text=media_text,
    video=Videos(video_pixels, video_features, video_positions),
    video_token="<image>", image_token="<image>", vision_modules=("model.vision_model", "model.connector"),
    generation={"fps": FPS, "max_frames": MAX_FRAMES}, expand=expand,
    language_model=lambda net: LanguageModel(net.get_input_embeddings(), net.model.text_model, net.lm_head),
    tower_tokens=lambda config, per_tile: patches_per_side(config) ** 2,
)
