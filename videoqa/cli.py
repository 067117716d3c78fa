"""The command line: thin commands over the pipeline; every error is rendered once, here.

torch and transformers are imported inside the commands so `videoqa --help` stays instant.
"""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from videoqa.errors import Exit, VideoQAError

app = typer.Typer(
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
    help="Ask local video-language models about video files. Exit codes: 0 ok, 1 internal error, "
    "2 bad usage or question, 3 unreadable video, 4 model not found or not loadable, 5 device not available, "
    "130 interrupted.",
)


@app.callback()
def _group() -> None:
    """Ask local video-language models about video files."""


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    mps = "mps"
    cpu = "cpu"


class DType(str, Enum):
    auto = "auto"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Preset name, local Hugging Face directory, or hub id.")
]
FramesOpt = Annotated[
    Optional[int], typer.Option("--frames", "-f", min=1, help="Frames sampled uniformly \\[default: the preset's].")
]
MaxNewOpt = Annotated[
    Optional[int], typer.Option("--max-new-tokens", "-n", min=0, help="Answer length limit \\[default: 256].")
]
TemperatureOpt = Annotated[
    Optional[float], typer.Option("--temperature", "-t", min=0.0, help="0 is greedy \\[default: the preset's].")
]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", min=0, help="Sample from the k likeliest tokens (0: all).")]


def _check_top_p(value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value} is not in the range (0, 1]")
    return value


TopPOpt = Annotated[
    Optional[float], typer.Option("--top-p", callback=_check_top_p, help="Nucleus sampling mass, in (0, 1].")
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Same seed, same sampled answer.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto picks cuda, then mps, then cpu.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="auto: float16 on cuda/mps, float32 on cpu.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of streaming.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]


def settings_from(preset, frames, max_new_tokens, temperature, top_k, top_p, seed):
    """Options given on the command line, the preset's defaults for the rest."""
    from videoqa.conversation import Settings
    from videoqa.decode import Sampling

    defaults = preset.generation
    return Settings(
        frames=frames or preset.frames,
        max_new_tokens=defaults.get("max_new_tokens", 256) if max_new_tokens is None else max_new_tokens,
        sampling=Sampling(
            temperature=defaults.get("temperature", 0.0) if temperature is None else temperature,
            top_k=defaults.get("top_k", 0) if top_k is None else top_k,
            top_p=defaults.get("top_p", 1.0) if top_p is None else top_p,
            seed=seed,
        ),
    )


def load_model(model: str, device: Device, dtype: DType, media: Path | None, frames: int | None):
    """Resolve and load the model, reading the media (if any) first so a bad file fails before a slow load."""
    from videoqa import models
    from videoqa.frames import read_media
    from videoqa.render import progress

    torch_device = models.pick_device(device.value)
    with progress("Finding the model…"):
        path, preset = models.resolve(model)
    timings = {}
    start = time.perf_counter()
    with progress("Reading frames…"):
        media_read = read_media(media, frames or preset.frames) if media else None
    timings["frames"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress(f"Loading {model}…"):
        loaded = models.load(model, path, preset, torch_device, models.pick_dtype(dtype.value, torch_device))
    timings["load"] = time.perf_counter() - start
    return loaded, media_read, timings


@app.command()
def ask(
    video: Annotated[Path, typer.Argument(help="Video or image file.", show_default=False)],
    question: Annotated[str, typer.Argument(help="What to ask about it.", show_default=False)],
    model: ModelOpt = "video-llava-7b",
    frames: FramesOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Answer a question about a video (or an image); the answer streams to stdout.

    [bold]Examples[/bold]

      videoqa ask clip.mp4 "Why is this video funny?"

      videoqa ask clip.mp4 "Describe the video." --frames 16 --temperature 0.2 --seed 0

      videoqa ask photo.jpg "What is unusual about this image?"

      videoqa ask clip.mp4 "What happens?" --json | jq -r .answer
    """
    from videoqa.conversation import Conversation, record
    from videoqa.frames import Frames, check_file
    from videoqa.render import print_json, progress, stream

    if not question.strip():
        raise VideoQAError("the question is empty")
    check_file(video)
    loaded, media, timings = load_model(model, device, dtype, video, frames)
    with progress("Encoding frames…"):
        convo = Conversation(loaded, media)
    settings = settings_from(loaded.preset, frames, max_new_tokens, temperature, top_k, top_p, seed)
    tokens = convo.ask(question, settings.max_new_tokens, settings.sampling)
    if json_output:
        with progress("Answering…"):
            tokens = list(tokens)
        frames_info = media if isinstance(media, Frames) else None
        print_json(record(loaded, video, question, frames_info, tokens, {**timings, **convo.timings}))
    else:
        stream(tokens, loaded.tokenizer)


@app.command()
def chat(
    video: Annotated[Optional[Path], typer.Argument(help="Video or image file.", show_default=False)] = None,
    model: ModelOpt = "video-llava-7b",
    frames: FramesOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Talk about a video over several turns; the video is encoded once.

    On a terminal: line editing and history, Ctrl-C stops an answer, Ctrl-D or /exit leaves,
    /help lists the commands (/video, /image, /reset, /frames, /save, /set).
    With stdin piped: one question per line, one answer (or, with --json, one JSON object) per line.

    [bold]Examples[/bold]

      videoqa chat clip.mp4

      printf 'What happens?\\nWhy?\\n' | videoqa chat clip.mp4 --json
    """
    from videoqa.chat import Chat, run_interactive
    from videoqa.frames import check_file

    if video is not None:
        check_file(video)
    loaded, media, timings = load_model(model, device, dtype, video, frames)
    settings = settings_from(loaded.preset, frames, max_new_tokens, temperature, top_k, top_p, seed)
    session = Chat(loaded, settings, json_output, timings)
    if video is not None:
        session.start(video, media)
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not json_output
    code = run_interactive(session) if interactive else session.run(sys.stdin)
    raise typer.Exit(code)


def main() -> None:
    """Entry point: run the app and turn every failure into one line on stderr and an exit code."""
    debug = "--debug" in sys.argv
    try:
        code = typer.main.get_command(app).main(standalone_mode=False)
    except typer.Abort:  # Ctrl-C at a prompt
        code = Exit.INTERRUPTED
    except typer.TyperException as e:  # bad usage, reported by typer's parser (no message: help was shown)
        _fail(e.format_message(), Exit.USAGE)
    except VideoQAError as e:
        if debug:
            raise
        _fail(str(e), e.code)
    except KeyboardInterrupt:
        code = Exit.INTERRUPTED
    except Exception as e:
        if debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {e}; run again with --debug for the traceback", Exit.INTERNAL)
    sys.exit(code or 0)


def _fail(message: str, code: int) -> None:
    from videoqa.render import error

    if message:
        error(" ".join(message.split()))
    sys.exit(code)
