"""The command line: thin commands over the pipeline; every error is rendered once, here.

torch and transformers are imported inside the commands so `videoqa --help` stays instant.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

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
    "6 caption: some videos failed, 7 caption: all failed, 130 interrupted.",
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
NoCompileOpt = Annotated[
    bool, typer.Option("--no-compile", help="Decode eagerly, without torch.compile (which runs on CUDA only).")
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the video feature cache.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr, only the answer (errors still).")]
PromptFileOpt = Annotated[
    Optional[Path], typer.Option("--prompt-file", help="Read the question from this file.", show_default=False)
]


def read_question(question: str | None, prompt_file: Path | None) -> str:
    """The question from the argument, `-` (stdin) or --prompt-file; never empty."""
    if prompt_file is not None:
        try:
            question = prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise VideoQAError(f"--prompt-file {prompt_file}: cannot read it ({type(e).__name__})") from None
    elif question == "-":
        question = sys.stdin.read()
    if question is None:
        raise VideoQAError("no question: give QUESTION, - to read it from stdin, or --prompt-file")
    from videoqa.prompt import check_question

    return check_question(question)


def is_stdin(path: Path | None) -> bool:
    """Whether the file is this process's stdin (`/dev/stdin`, `/dev/fd/0`, or the file redirected into it)."""
    try:
        return path is not None and os.path.samestat(path.stat(), os.fstat(0))
    except OSError:  # no stdin, or a path check_file will report
        return False


def quiet_mode(quiet: bool) -> None:
    from videoqa.render import stderr

    stderr.quiet = quiet


def note_eager(ready: Ready, no_compile: bool) -> None:
    """Say once, when an answer is about to start, that compilation was asked for but is not used here."""
    from videoqa.render import note

    device = ready.model.net.device.type
    if not no_compile and device != "cuda":
        note(f"the decode step is compiled on CUDA only; decoding eagerly on {device} (--no-compile hides this)")


def settings_from(ready: Ready, frames, max_new_tokens, temperature, top_k, top_p, seed, compile=False):
    """Options given on the command line, the preset's defaults for the rest."""
    from videoqa.conversation import Settings
    from videoqa.decode import Sampling

    device = ready.model.net.device.type
    defaults = ready.model.preset.generation
    return Settings(
        compile=compile and device == "cuda",
        frames=frames or ready.model.preset.frames,
        max_new_tokens=defaults.get("max_new_tokens", 256) if max_new_tokens is None else max_new_tokens,
        sampling=Sampling(
            temperature=defaults.get("temperature", 0.0) if temperature is None else temperature,
            top_k=defaults.get("top_k", 0) if top_k is None else top_k,
            top_p=defaults.get("top_p", 1.0) if top_p is None else top_p,
            seed=seed,
        ),
    )


@dataclass
class Ready:
    model: Any  # videoqa.models.Model
    media: Any  # Frames, a PIL image, or None
    features: Any  # the media's features from the feature cache, or None
    cache: Any  # videoqa.cache.FeatureCache, or None with --no-cache
    timings: dict[str, float]


def load_model(
    model: str, device: Device, dtype: DType, media: Path | None, frames: int | None, cache: bool,
    videos: bool = False,
) -> Ready:
    """Resolve the model, read the media (or its cached features), then load the weights: a bad file fails fast.

    A video (`media`, or `videos` for caption) given to an image-only model is refused before the load too.
    """
    from videoqa import models
    from videoqa.cache import FeatureCache, model_identity
    from videoqa.conversation import read
    from videoqa.frames import is_image
    from videoqa.render import progress

    torch_device = models.pick_device(device.value)
    with progress("Finding the model…"):
        path, preset = models.resolve(model)
    if videos or (media is not None and not is_image(media)):
        models.check_video(preset.architecture, model)
        models.check_frames(models.config_of(path), frames or preset.frames)
    torch_dtype = models.pick_dtype(dtype.value, torch_device)
    features_cache = FeatureCache(model_identity(path, torch_dtype)) if cache else None
    timings = {}
    start = time.perf_counter()
    with progress("Reading frames…"):
        media_read, features = read(media, frames or preset.frames, features_cache) if media else (None, None)
    timings["frames"] = time.perf_counter() - start
    start = time.perf_counter()
    with progress(f"Loading {model}…"):
        loaded = models.load(model, path, preset, torch_device, torch_dtype)
    timings["load"] = time.perf_counter() - start
    return Ready(loaded, media_read, features, features_cache, timings)


@app.command()
def ask(
    # readable=False on file arguments: check_file says why a file cannot be read (exit 3), click would say bad usage
    video: Annotated[Path, typer.Argument(help="Video or image file.", show_default=False, readable=False)],
    question: Annotated[
        Optional[str], typer.Argument(help="What to ask about it; - reads it from stdin.", show_default=False)
    ] = None,
    prompt_file: PromptFileOpt = None,
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
    no_cache: NoCacheOpt = False,
    no_compile: NoCompileOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Answer a question about a video (or an image); the answer streams to stdout.

    [bold]Examples[/bold]

      videoqa ask clip.mp4 "Why is this video funny?"

      videoqa ask clip.mp4 "Describe the video." --frames 16 --temperature 0.2 --seed 0

      videoqa ask photo.jpg "What is unusual about this image?"

      videoqa ask clip.mp4 "What happens?" --json | jq -r .answer

      echo "What happens next?" | videoqa ask clip.mp4 - --quiet
    """
    from videoqa.conversation import Conversation, record, remember
    from videoqa.frames import Frames, check_file, seekable
    from videoqa.render import note, print_json, progress, stream

    quiet_mode(quiet)
    if is_stdin(video) and (question == "-" or is_stdin(prompt_file)):
        raise VideoQAError(f"{video} and the question both read stdin: give the question as an argument or a file")
    question = read_question(question, prompt_file)
    with seekable(video) as readable:  # a pipe is read to its end, into a temporary file
        check_file(readable)
        ready = load_model(model, device, dtype, readable, frames, not no_cache)
        loaded, media, timings = ready.model, ready.media, ready.timings
        settings = settings_from(ready, frames, max_new_tokens, temperature, top_k, top_p, seed, not no_compile)
        with progress("Encoding frames…"):
            convo = Conversation(loaded, media, ready.features, settings.compile)
        problem = remember(ready.cache, readable, convo)
    if problem:
        note(problem)
    tokens = convo.ask(question, settings.max_new_tokens, settings.sampling)
    note_eager(ready, no_compile)
    if json_output:
        with progress("Answering…"):
            tokens = list(tokens)
        frames_info = media if isinstance(media, Frames) else None
        print_json(record(loaded, video, question, convo.prompt, frames_info, tokens, {**timings, **convo.timings}))
    else:
        stream(tokens, loaded.tokenizer)


@app.command()
def chat(
    video: Annotated[
        Optional[Path], typer.Argument(help="Video or image file.", show_default=False, readable=False)
    ] = None,
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
    no_cache: NoCacheOpt = False,
    no_compile: NoCompileOpt = False,
    quiet: QuietOpt = False,
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
    from videoqa.frames import check_file, seekable

    quiet_mode(quiet)
    if is_stdin(video):
        raise VideoQAError(f"{video}: chat reads its questions from stdin, so the video cannot come from it too")
    with seekable(video) as readable:  # a pipe is read to its end, into a temporary file
        if readable is not None:
            check_file(readable)
        ready = load_model(model, device, dtype, readable, frames, not no_cache)
    settings = settings_from(ready, frames, max_new_tokens, temperature, top_k, top_p, seed, not no_compile)
    session = Chat(ready.model, settings, json_output, ready.timings, ready.cache)
    if video is not None:
        session.start(video, ready.media, ready.features)
    note_eager(ready, no_compile)
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not json_output
    code = run_interactive(session) if interactive else session.run(sys.stdin)
    raise typer.Exit(code)


class Format(str, Enum):
    jsonl = "jsonl"
    csv = "csv"


@app.command()
def caption(
    paths: Annotated[list[Path], typer.Argument(help="Video files and folders.", show_default=False, readable=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question asked of every video.")] = (
        "Describe this video."
    ),
    prompt_file: PromptFileOpt = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output file [default: stdout].", show_default=False)
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Record format.")] = Format.jsonl,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Walk folders recursively.")] = False,
    glob: Annotated[str, typer.Option("--glob", help="File name patterns in folders, comma-separated.")] = (
        "*.mp4,*.mkv,*.mov,*.avi,*.webm,*.m4v,*.mpg,*.mpeg,*.flv,*.wmv"
    ),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Videos decoded together.")] = 4,
    resume: Annotated[bool, typer.Option("--resume", help="Skip videos already in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    model: ModelOpt = "video-llava-7b",
    frames: FramesOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Caption (or question) many videos: one record per video, written as soon as it is done.

    A video that cannot be read gets a record with [bold]error[/bold] set and the run goes on.
    Exit codes: 0 all captioned (or skipped), 6 some failed, 7 all failed, 130 stopped by Ctrl-C
    (after writing the batch in flight).

    [bold]Examples[/bold]

      videoqa caption clips/ --out captions.jsonl

      videoqa caption clips/ -r --glob "*.mp4" --out captions.jsonl --resume

      videoqa caption a.mp4 b.mp4 --prompt "What sport is this?" --format csv > answers.csv
    """
    from videoqa import caption as captioning
    from videoqa.render import summary

    quiet_mode(quiet)
    question = read_question(prompt, prompt_file)
    videos = captioning.find_videos(paths, glob, recursive)
    if not videos:
        raise VideoQAError(f"no videos found in {', '.join(map(str, paths))} matching {glob}")
    output = captioning.Output(out, fmt.value, resume, overwrite)
    if all(str(v) in output.done for v in videos):
        summary({"done": "0", "failed": "0", "skipped": str(len(videos)), "videos/s": "-"})
        return
    try:
        ready = load_model(model, device, dtype, None, frames, cache=False, videos=True)
        output.open()
        settings = settings_from(ready, frames, max_new_tokens, temperature, top_k, top_p, seed)
        tally = captioning.run(ready.model, videos, question, settings, output, batch_size)
    finally:
        output.close()
    seconds = time.perf_counter() - tally.start
    summary({"done": str(tally.done), "failed": str(tally.failed), "skipped": str(tally.skipped),
             "videos/s": f"{(tally.done + tally.failed) / seconds:.2f}"})
    raise typer.Exit(tally.exit_code())


cache_app = typer.Typer(help="The video feature cache: features of videos already seen, reused across runs.")
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info() -> None:
    """Where the cache is, how many videos it holds, its size and bound (VIDEOQA_CACHE_MAX_MB)."""
    from videoqa.cache import cache_dir, info

    facts = info(cache_dir())
    print(f"directory  {facts['directory']}\nentries    {facts['entries']}\n"
          f"size       {facts['bytes'] / 2**20:.1f} MiB of {facts['max_bytes'] / 2**20:.0f} MiB")


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every cached entry."""
    from videoqa.cache import cache_dir, clear

    print(f"removed {clear(cache_dir())} entries")


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
