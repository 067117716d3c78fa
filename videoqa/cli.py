"""The command line: thin commands over the pipeline; every error is rendered once, here.

torch and transformers are imported inside the commands so `videoqa --help` stays instant.
"""

from __future__ import annotations

import functools
import inspect
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
    add_completion=False,
    help="Ask local video-language models about video files. Exit codes: 0 ok, 1 internal error, "
    "2 bad usage or question, 3 unreadable video, 4 model not found or not loadable, 5 device not available, "
    "6 caption: some videos failed, 7 caption: all failed, 129/143 caption stopped by SIGHUP/SIGTERM, "
    "130 interrupted, 141 stdout's reader went away.",
)


@app.callback(invoke_without_command=True)
def _group(ctx: typer.Context) -> None:
    """Ask local video-language models about video files."""
    if ctx.invoked_subcommand is None:
        raise VideoQAError("missing command: ask, chat, caption or cache (videoqa --help shows them)")


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


DEBUG = False  # VIDEOQA_DEBUG=1 or --debug: errors keep their exit code and show a traceback too


def _debug(value: bool) -> bool:
    global DEBUG
    DEBUG = DEBUG or value
    return value


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Preset name, local Hugging Face directory, or hub id.")
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto picks cuda, then mps, then cpu.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="auto: float16 on cuda/mps, float32 on cpu.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of streaming.")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", callback=_debug, is_eager=True, help="Show the traceback of an error (or set VIDEOQA_DEBUG=1).")
]
NoCompileOpt = Annotated[
    bool, typer.Option("--no-compile", help="Decode eagerly, without torch.compile (which runs on CUDA only).")
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the video feature cache.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr, only the answer (errors still).")]
PromptFileOpt = Annotated[
    Optional[Path], typer.Option("--prompt-file", help="Read the question from this file (at most 1 MB).", show_default=False)
]


def _checker(spec):
    def check(value):
        reason = None if value is None else spec.problem(value)
        if reason:
            raise typer.BadParameter(reason)
        return value

    return check


def with_settings(command):
    """Give `command` one option per setting of the one table (videoqa.settings.SPECS), handed to it as `given`:
    the values given on the command line (None where not given)."""
    from videoqa.settings import SPECS

    params = list(inspect.signature(command, eval_str=True).parameters.values())
    at = [p.name for p in params].index("given")
    options = [
        inspect.Parameter(spec.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            Optional[spec.kind], typer.Option(*spec.flags, help=spec.help, callback=_checker(spec), show_default=False)
        ])
        for spec in SPECS.values()
    ]

    @functools.wraps(command)
    def run(**kwargs):
        given = {name: kwargs.pop(name) for name in SPECS}
        return command(**kwargs, given=given)

    run.__signature__ = inspect.Signature(params[:at] + options + params[at + 1 :])
    return run


def quiet_mode(quiet: bool) -> None:
    from videoqa.render import stderr

    stderr.quiet = quiet


def settings_from(ready: Ready, given: dict):
    """Options given on the command line over the preset's defaults."""
    from videoqa.settings import defaults

    preset = ready.model.preset
    return defaults(preset.frames, preset.generation).changed(**{k: v for k, v in given.items() if v is not None})


@dataclass
class Ready:
    model: Any  # videoqa.models.Model
    media: Any  # Frames, a PIL image, or None
    features: Any  # the media's features from the feature cache, or None
    cache: Any  # videoqa.cache.FeatureCache, or None with --no-cache
    timings: dict[str, float]


def open_cache(path: Path, dtype):
    """The model's feature cache. A bad VIDEOQA_CACHE_MAX_MB is a note and the default bound here, not a failure:
    the cache only saves time (`cache info`, which is about the cache, refuses it)."""
    from videoqa.cache import DEFAULT_MAX_MB, FeatureCache, max_bytes, model_identity
    from videoqa.render import note

    try:
        limit = max_bytes()
    except VideoQAError as e:
        note(f"{e}; using the default, {DEFAULT_MAX_MB} MiB")
        limit = DEFAULT_MAX_MB * 2**20
    return FeatureCache(model_identity(path, dtype), limit)


def load_model(
    model: str, device: Device, dtype: DType, media: Path | None, frames: int | None, cache: bool,
    videos: bool = False,
) -> Ready:
    """Resolve the model, read the media (or its cached features), then load the weights: a bad file fails fast.

    A video (`media`, or `videos` for caption) given to an image-only model is refused before the load too.
    """
    from videoqa import models
    from videoqa.conversation import read
    from videoqa.frames import is_image
    from videoqa.render import progress

    torch_device = models.pick_device(device.value)
    with progress("Finding the model…"):
        path, preset = models.resolve(model)
    config = models.config_of(path)
    if videos or (media is not None and not is_image(media)):
        models.check_video(preset.architecture, model)
        models.check_frames(config, frames or preset.frames)
    torch_dtype = models.pick_dtype(dtype.value, torch_device)
    features_cache = open_cache(path, torch_dtype) if cache else None
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
@with_settings
def ask(
    video: Annotated[Path, typer.Argument(help="Video or image file.", show_default=False)],
    question: Annotated[
        Optional[str], typer.Argument(help="What to ask about it; - reads it from stdin.", show_default=False)
    ] = None,
    prompt_file: PromptFileOpt = None,
    model: ModelOpt = "video-llava-7b",
    given: dict = None,
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
    from videoqa.frames import Frames, check_file
    from videoqa.questions import read_question
    from videoqa.render import note, print_json, progress, stream

    quiet_mode(quiet)
    question = read_question(question, prompt_file)
    check_file(video)
    ready = load_model(model, device, dtype, video, given["frames"], not no_cache)
    loaded, media, timings = ready.model, ready.media, ready.timings
    settings = settings_from(ready, given)
    with progress("Encoding frames…"):
        convo = Conversation(loaded, media, ready.features, compile_on(ready, no_compile))
    problem = remember(ready.cache, video, convo)
    if problem:
        note(problem)
    tokens = convo.ask(question, settings.max_new_tokens, settings.sampling)
    if json_output:
        with progress("Answering…"):
            tokens = list(tokens)
        frames_info = media if isinstance(media, Frames) else None
        print_json(record(loaded, video, question, convo.prompt, frames_info, tokens, {**timings, **convo.timings}))
    else:
        stream(tokens, loaded.tokenizer)


def compile_on(ready: Ready, no_compile: bool) -> bool:
    return not no_compile and ready.model.net.device.type == "cuda"


@app.command()
@with_settings
def chat(
    video: Annotated[Optional[Path], typer.Argument(help="Video or image file.", show_default=False)] = None,
    model: ModelOpt = "video-llava-7b",
    given: dict = None,
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
    from videoqa.frames import check_file
    from videoqa.questions import lines, stdin_bytes

    quiet_mode(quiet)
    stdin = stdin_bytes()
    if video is not None:
        check_file(video)
    ready = load_model(model, device, dtype, video, given["frames"], not no_cache)
    session = Chat(ready.model, settings_from(ready, given), json_output, ready.timings, ready.cache,
                   compile=compile_on(ready, no_compile))
    if video is not None:
        session.start(video, ready.media, ready.features)
    interactive = sys.stdin.isatty() and sys.stdout is not None and sys.stdout.isatty() and not json_output
    code = run_interactive(session) if interactive else session.run(lines(stdin))
    raise typer.Exit(code)


class Format(str, Enum):
    jsonl = "jsonl"
    csv = "csv"


@app.command()
@with_settings
def caption(
    paths: Annotated[list[Path], typer.Argument(help="Video files and folders.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question asked of every video.")] = (
        "Describe this video."
    ),
    prompt_file: PromptFileOpt = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output file; - or none: stdout.", show_default=False)
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
    given: dict = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Caption (or question) many videos: one record per video, written as soon as it is done.

    A video that cannot be read gets a record with [bold]error[/bold] set and the run goes on.
    Exit codes: 0 all captioned (or skipped), 6 some failed, 7 all failed, 130 stopped by Ctrl-C,
    143 by SIGTERM, 129 by SIGHUP (each after writing the batch in flight).

    [bold]Examples[/bold]

      videoqa caption clips/ --out captions.jsonl

      videoqa caption clips/ -r --glob "*.mp4" --out captions.jsonl --resume

      videoqa caption a.mp4 b.mp4 --prompt "What sport is this?" --format csv > answers.csv
    """
    from videoqa import caption as captioning
    from videoqa.questions import read_question
    from videoqa.render import summary

    quiet_mode(quiet)
    question = read_question(prompt, prompt_file)
    videos = captioning.find_videos(paths, glob, recursive)
    if not videos:
        raise VideoQAError(f"no videos found in {', '.join(map(str, paths))} matching {glob}")
    output = captioning.Output(out, fmt.value, resume=resume, overwrite=overwrite, inputs=videos)
    if all(captioning.identity(v) in output.done for v in videos):
        summary({"done": "0", "failed": "0", "skipped": str(len(videos)), "videos/s": "-"})
        return
    try:
        ready = load_model(model, device, dtype, None, given["frames"], cache=False, videos=True)
        output.open()
        tally = captioning.run(ready.model, videos, question, settings_from(ready, given), output, batch_size)
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
    from videoqa.output import write

    facts = info(cache_dir())
    write(f"directory  {facts['directory']}\nentries    {facts['entries']}\n"
          f"size       {facts['bytes'] / 2**20:.1f} MiB of {facts['max_bytes'] // 2**20} MiB\n")


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every cached entry."""
    from videoqa.cache import cache_dir, clear
    from videoqa.output import write

    write(f"removed {clear(cache_dir())} entries\n")


def main() -> None:
    """Entry point: run the app; every failure is one line on stderr and a documented exit code."""
    sys.exit(run())


def run() -> int:
    from videoqa.output import OutputClosed

    global DEBUG
    DEBUG = os.environ.get("VIDEOQA_DEBUG") == "1"
    try:
        return typer.main.get_command(app).main(standalone_mode=False) or 0
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C
        return Exit.INTERRUPTED
    except typer.TyperException as e:  # bad usage, reported by typer's parser
        return failed(e.format_message(), Exit.USAGE)
    except VideoQAError as e:
        return failed(str(e), e.code)
    except (OutputClosed, BrokenPipeError):  # `| head -1`: end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # and let nothing flush into the closed pipe at exit
        return Exit.PIPE
    except Exception as e:
        return failed(f"internal error: {type(e).__name__}: {e}; run again with --debug for the traceback", Exit.INTERNAL)


def failed(message: str, code: int) -> int:
    """Say what went wrong in one line (after the traceback, with --debug); the documented exit code."""
    import traceback

    from videoqa.render import error

    if DEBUG:
        traceback.print_exc()
    if message:  # typer's parser has already shown the help when there is none
        error(" ".join(message.split()))
    return code
