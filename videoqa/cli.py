"""The command line: thin commands over the pipeline; every error is rendered once, here.

torch and transformers are imported inside the commands so `videoqa --help` stays instant.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from videoqa.errors import Exit, VideoQAError
from videoqa.questions import CAPTION_PROMPT
from videoqa.settings import DEVICES, DTYPES, FRAMING, QUANTIZE

app = typer.Typer(
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
    add_completion=False,
    help="Ask local video-language models about video files. Exit codes: 0 ok, 1 internal error, "
    "2 bad usage or question, 3 unreadable video, 4 model not found or not loadable, 5 device not available, "
    "6 caption/timeline/find: some videos or segments failed, 7: all failed, 8 out of memory, 129/143 caption or "
    "timeline stopped by SIGHUP/SIGTERM, "
    "130 interrupted, 141 stdout's reader went away.",
)


def _version(value: bool) -> None:
    if value:
        from videoqa import __version__

        typer.echo(f"videoqa {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _group(ctx: typer.Context, version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print videoqa's version and exit.")] = False) -> None:
    """Ask local video-language models about video files."""
    if ctx.invoked_subcommand is None:
        names = list(typer.main.get_command(app).commands)  # every command, as registered
        raise VideoQAError(f"missing command: {', '.join(names[:-1])} or {names[-1]} (videoqa --help shows them)")


def _flags_without_a_type() -> None:
    """typer labels a flag `<bool>` in --help, as if it took a value: a flag's help shows no type."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)


_flags_without_a_type()

# The choices are the API's (settings.py), so the two cannot drift apart
Device = Enum("Device", {name: name for name in DEVICES}, type=str)
DType = Enum("DType", {name: name for name in DTYPES}, type=str)
Quantize = Enum("Quantize", {name: name for name in QUANTIZE}, type=str)


DEBUG = False  # VIDEOQA_DEBUG=1 or --debug: errors keep their exit code and show a traceback too


def _debug(value: bool) -> bool:
    global DEBUG
    DEBUG = DEBUG or value
    return value


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", metavar="<preset|dir|hub id>",
                      help="Preset name, local Hugging Face directory, or hub id.")
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto picks cuda, then mps, then cpu.")]
DTypeOpt = Annotated[DType, typer.Option(
    "--dtype", help="auto: float16 on cuda/mps; on cpu bfloat16 where the CPU computes it natively (and with "
    "--quantize int8/int4), else float32.")]
QuantizeOpt = Annotated[Quantize, typer.Option(
    "--quantize", help="The language model's linear layers and LM head in fewer bytes: int8, int4 (CPU) or nf4; "
    "torchao on the CPU, bitsandbytes on CUDA and for nf4 (pip install 'videoqa\\[quant]').")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", metavar="<size>",
    help="Cap the memory the run may use below what the device has free, e.g. 6GB, 6GiB, 6000MB.",
    show_default=False)]
SkipCheckOpt = Annotated[bool, typer.Option("--skip-memory-check", help="Load even if the estimate says it does not fit.")]
class Shown(str, Enum):
    text = "text"
    json = "json"


ShownOpt = Annotated[Shown, typer.Option("--format", help="text: the answer as it streams; json: one JSON object "
                                         "(chat: one per turn), the record schema.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Short for --format json.")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", callback=_debug, is_eager=True, help="Show the traceback of an error (or set VIDEOQA_DEBUG=1).")
]
NoCompileOpt = Annotated[
    bool, typer.Option("--no-compile", help="Decode eagerly, without torch.compile (which runs on CUDA only).")
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the video feature cache.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr, only the answer (errors still).")]
PromptFileOpt = Annotated[
    Optional[Path], typer.Option("--prompt-file", metavar="<file>", show_default=False,
                                 help="Read the question from this file (at most 1 MB).")
]


def _time(value: str | None) -> float | None:
    from videoqa.windows import parse_time

    try:
        return None if value is None else parse_time(value)
    except VideoQAError as e:
        raise typer.BadParameter(str(e)) from None


StartOpt = Annotated[Optional[str], typer.Option(
    "--start", callback=_time, show_default=False, metavar="<time>",
    help="Sample frames from this time on: seconds (90, 90.5) or [HH:]MM:SS[.mmm] \\[default: the start].")]
EndOpt = Annotated[Optional[str], typer.Option(
    "--end", callback=_time, show_default=False, metavar="<time>",
    help="...and before this time \\[default: the end of the video].")]
SegmentsOpt = Annotated[Optional[int], typer.Option(
    "--segments", min=1, show_default=False, help="Cut the video into this many equal segments instead.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Videos or segments answered together.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Skip what --out holds already.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", metavar="<text>", show_default=False,
    help="End the answer where its text first holds TEXT (left out of the answer); repeatable.")]
SheetOpt = Annotated[Optional[Path], typer.Option(
    "--sheet", metavar="<file.png>", show_default=False,
    help="Also draw the sampled frames as a contact sheet (PNG), each labelled with its time (and, with --explain, "
         "its attention share).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", metavar="<file>", help="Output file; - or none: stdout.",
                                                show_default=False)]
NoLogOpt = Annotated[bool, typer.Option("--no-log", help="Keep this out of the history (videoqa logs); VIDEOQA_LOG=0 "
                                        "keeps everything out.")]
LogOpt = Annotated[bool, typer.Option("--log", help="Also append each record to the history (videoqa logs).")]
RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", metavar="[ADDRESS]", show_default=False,
    help="Run on Ray Data: alone, a Ray runtime on this machine's CPUs and GPUs; auto, HOST:PORT or "
         "ray://HOST:10001 attach to a cluster (pip install 'videoqa[ray]').")]
RayWorkersOpt = Annotated[int, typer.Option(
    "--ray-workers", min=1, help="With --ray and no GPU: model actors, each on a CPU (with GPUs: one per GPU).")]
RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|[\w.-]+:\d+")


def _checker(spec):
    def check(value):
        reason = None if value is None else spec.problem(value)
        if reason:
            raise typer.BadParameter(reason)
        return value

    return check


@dataclass(frozen=True)
class Run:
    """The options every answering command shares: which model, on what, how loud."""

    model: str
    device: Device
    dtype: DType
    quantize: Quantize
    max_memory: str | None
    skip_memory_check: bool
    no_compile: bool
    quiet: bool


@dataclass(frozen=True)
class Reply:
    """The options of the commands that answer on stdout (ask, chat): how, and with the feature cache or not."""

    json: bool
    cache: bool


def _options(table: dict) -> list[inspect.Parameter]:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return [inspect.Parameter(name, kind, default=default, annotation=annotation)
            for name, (annotation, default) in table.items()]


RUN_OPTIONS = {  # Run's fields, then --debug (read by its callback)
    "model": (ModelOpt, "video-llava-7b"), "device": (DeviceOpt, Device.auto), "dtype": (DTypeOpt, DType.auto),
    "quantize": (QuantizeOpt, Quantize.none), "max_memory": (MaxMemoryOpt, None),
    "skip_memory_check": (SkipCheckOpt, False), "no_compile": (NoCompileOpt, False), "quiet": (QuietOpt, False),
    "debug": (DebugOpt, False),
}
REPLY_OPTIONS = {"shown": (ShownOpt, Shown.text), "json_output": (JsonOpt, False), "no_cache": (NoCacheOpt, False)}
WINDOW_OPTIONS = {"start": (StartOpt, None), "end": (EndOpt, None)}


def _setting(spec) -> inspect.Parameter:
    option = typer.Option(*spec.flags, help=spec.help, callback=_checker(spec), show_default=False)
    return inspect.Parameter(spec.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                             annotation=Annotated[Optional[spec.kind], option])


def _gather(kwargs: dict) -> dict:
    """The shared options' values out of `kwargs`, as the commands take them: given, run, reply."""
    from videoqa.settings import SPECS

    kwargs.pop("debug")
    run = Run(**{name: kwargs.pop(name) for name in RUN_OPTIONS if name != "debug"})
    quiet_mode(run.quiet)
    gathered = {"given": {name: kwargs.pop(name) for name in SPECS if name in kwargs}, "run": run}
    if "stop" in kwargs:  # repeatable: a list, not one of the table's settings
        gathered["given"]["stop"] = tuple(kwargs.pop("stop") or ()) or None
    if "shown" in kwargs:
        shown, json_output = kwargs.pop("shown"), kwargs.pop("json_output")
        gathered["reply"] = Reply(json=json_output or shown is Shown.json, cache=not kwargs.pop("no_cache"))
    if "start" in kwargs:
        from videoqa.windows import window

        gathered["window"] = window(kwargs.pop("start"), kwargs.pop("end"))
    return gathered


def shared_options(command=None, *, settings: tuple[str, ...] | None = None):
    """Give `command` the options it shares with the others, in place of its parameters `given` (one option per
    setting of the one table, videoqa.settings.SPECS, or of the `settings` named; None where not given), `run`
    (Run), `reply` (Reply) and `window` (--start and --end, as a videoqa.windows.Window)."""
    from videoqa.settings import SPECS

    if command is None:
        return functools.partial(shared_options, settings=settings)
    params = list(inspect.signature(command, eval_str=True).parameters.values())
    specs = [spec for spec in SPECS.values() if settings is None or spec.name in settings]
    stop = [] if settings is not None else _options({"stop": (StopOpt, None)})  # the commands that generate
    shared = {"given": [_setting(spec) for spec in specs] + stop, "run": _options(RUN_OPTIONS),
              "reply": _options(REPLY_OPTIONS), "window": _options(WINDOW_OPTIONS)}

    @functools.wraps(command)
    def wrapper(**kwargs):
        gathered = _gather(kwargs)  # takes the shared options out of kwargs
        return command(**kwargs, **gathered)

    wrapper.__signature__ = inspect.Signature([q for p in params for q in shared.get(p.name, [p])])
    return wrapper


def is_stdin(path: Path | None) -> bool:
    """Whether the file is this process's stdin (`/dev/stdin`, `/dev/fd/0`, or the file redirected into it)."""
    try:
        return path is not None and os.path.samestat(path.stat(), os.fstat(0))
    except OSError:  # no stdin, or a path check_file will report
        return False


def quiet_mode(quiet: bool) -> None:
    from videoqa.render import stderr

    stderr.quiet = quiet


def checkpoint(run: Run, given: dict, cache: bool, batch_size: int = 1, medium: str | None = None):
    """The model to load, resolved on first need (a bad file is refused before the model is looked for), with
    the run its memory is checked for: its frames, answer length, batch and medium ("video"; None: known once
    the file is read)."""
    from videoqa.render import progress

    with progress("Importing torch and transformers…"):  # session imports torch; the config classes transformers
        import transformers  # noqa: F401

        from videoqa.session import Checkpoint
    by_time = given.get("fps") is not None  # then at least one frame, capped once the video's length is known
    if by_time and given.get("frames") is not None:
        raise VideoQAError("--frames and --fps: give one (a count spread evenly, or a rate by time)")
    workload = {"frames": 1 if by_time else given.get("frames"), "max_new_tokens": given.get("max_new_tokens"),
                "batch_size": batch_size, "medium": medium}
    return Checkpoint(run.model, device=run.device.value, dtype=run.dtype.value, cache=cache,
                      quantize=run.quantize.value, max_memory=run.max_memory, check_memory=not run.skip_memory_check,
                      workload=workload)


def read_media(found, path: Path, given: dict, window, more: list[Path] = ()) -> list:
    """The video (its `window`) or image, and the files asked about with it (`more`, whole), each checked before
    the model is looked for (a bad file, or a kind the model does not take, fails fast; the memory check counts
    them all), then read; a pipe through a temporary copy."""
    from dataclasses import replace

    from videoqa.frames import seekable
    from videoqa.render import progress

    framing = {name: given[name] for name in FRAMING}
    with seekable(path) as readable:
        found.expect(readable, given["frames"], fps=given["fps"], start=window.start, end=window.end)
        for other in more:
            found.expect(other, given["frames"], fps=given["fps"], more=True)
        prepare(found)
        with progress("Reading frames…"):
            media = found.media(readable, **framing, start=window.start, end=window.end)
            others = [found.media(other, **framing) for other in more]
    return [replace(media, path=path), *others]  # the answer names the pipe, not its copy


def prepare(found) -> None:
    """Find (or download) and check the model, once, under its own spinner label."""
    from videoqa.render import progress

    if not found.resolved:
        with progress(f"Finding {found.name}…"):
            found.resolve()


def load(found, run: Run):
    from videoqa.render import progress

    prepare(found)
    with progress(f"Loading the weights of {found.name}…"):
        return found.load(compile=not run.no_compile)


@app.command()
@shared_options
def ask(
    # readable=False on file arguments: check_file says why a file cannot be read (exit 3), click would say bad usage
    video: Annotated[Path, typer.Argument(help="Video or image file.", show_default=False, readable=False)],
    question: Annotated[
        Optional[str], typer.Argument(help="What to ask about it; - reads it from stdin.", show_default=False,
                                      metavar="<text>")
    ] = None,
    prompt_file: PromptFileOpt = None,
    choices: Annotated[Optional[str], typer.Option(
        "--choices", metavar="<a|b|...>", show_default=False,
        help="Options separated by |: the answer is the one the model finds likeliest (each scored by the summed "
             "log-probability of its tokens; --json lists every option's).")] = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Where the model looked: each frame's share of the answer's attention (mean over layers "
        "and heads), a line per frame on stderr and frames[i].attention in --json; runs eager attention.")] = False,
    sheet: SheetOpt = None,
    more: Annotated[Optional[list[Path]], typer.Option(
        "--with", metavar="<file>", show_default=False, readable=False,
        help="Another image or video the question is about (repeatable), read whole; each stands in the prompt "
             "where the model's template places it.")] = None,
    no_log: NoLogOpt = False,
    window=None,
    given: dict = None,
    run: Run = None,
    reply: Reply = None,
) -> None:
    """Answer a question about a video (or an image, or a part of a video, or several files); the answer streams to
    stdout.

    [bold]Examples[/bold]

      videoqa ask clip.mp4 "Why is this video funny?"

      videoqa ask clip.mp4 "Describe the video." --frames 16 --temperature 0.2 --seed 0

      videoqa ask photo.jpg "What is unusual about this image?"

      videoqa ask clip.mp4 "What happens?" --json | jq -r .answer

      videoqa ask lecture.mp4 "What is on the board?" --start 1:30 --end 2:00

      videoqa ask clip.mp4 "Which sport is this?" --choices "tennis|golf|soccer" --json | jq .choices

      videoqa ask clip.mp4 "What happens?" --logprobs 3 --json | jq '.logprobs[0]'

      videoqa ask clip.mp4 "Where is the dog?" --explain --sheet frames.png

      videoqa ask clip.mp4 "Is the person in the photo in the video?" --with photo.jpg

      echo "What happens next?" | videoqa ask clip.mp4 - --quiet
    """
    from videoqa.output import check_stdout
    from videoqa.questions import read_question
    from videoqa.render import progress

    check_stdout()
    if is_stdin(video) and (question == "-" or is_stdin(prompt_file)):
        raise VideoQAError(f"{video} and the question both read stdin: give the question as an argument or a file")
    question = read_question(question, prompt_file)
    options = None if choices is None else choices.split("|")
    if options is not None and (len(options) < 2 or not all(o.strip() for o in options)):
        raise VideoQAError(f"--choices {choices!r}: give two or more options separated by |, e.g. \"tennis|golf\"")
    more = more or []
    check_looking(video, explain=explain, sheet=sheet, choices=options is not None,
                  logprobs=given["logprobs"] is not None, more=more)
    found = checkpoint(run, given, cache=reply.cache)
    media = read_media(found, video, given, window, more)
    loaded = load(found, run)
    with progress("Encoding frames…"):
        conversation = loaded.chat(media, **given)
    answer = shown(conversation, question, options, json_output=reply.json, explain=explain)
    if not no_log:  # the history (videoqa logs), once the answer is out
        from videoqa import history

        history.log(answer.record(), command="ask", settings=loaded.settings(**given),
                    window=media[0].frames.window if media[0].frames else None, media=[video, *more])
    if explain:
        attention(answer.frames)
    if sheet is not None:
        conversation.sheet(sheet)


def shown(conversation, question: str, options: list[str] | None, *, json_output: bool, explain: bool):
    """The answer (or the likeliest of the options) on stdout: its record under --json, else its text, streamed as
    it is generated; the Answer."""
    from videoqa.output import print_json, stream, write
    from videoqa.render import progress

    if options is not None:
        with progress("Scoring the options…"):
            chosen = conversation.choose(question, options)
        if json_output:
            print_json(chosen.record())
        else:
            write(chosen.text + "\n")
        return chosen
    if json_output:
        with progress("Answering…"):
            answer = conversation.ask(question, explain=explain)
        print_json(answer.record())
        return answer
    stream(conversation.stream(question, explain=explain), waiting=progress("Reading the prompt…"))
    return conversation.answers[-1]


def check_looking(video: Path, *, explain: bool, sheet: Path | None, choices: bool, logprobs: bool,
                  more: list[Path]) -> None:
    """--explain and --sheet are about a video's frames (--explain one video's), --explain and --logprobs about a
    generated answer, --with about files: refused before anything loads otherwise."""
    from videoqa.frames import is_image

    if any(is_stdin(other) for other in more):
        raise VideoQAError("--with -: the files asked about with the first one are read from disk, not stdin")
    if explain and more:
        raise VideoQAError("--explain and --with: the attention is shared out over one video's frames")
    if explain and choices:
        raise VideoQAError("--explain and --choices: --explain shares out the attention of a generated answer")
    if logprobs and choices:
        raise VideoQAError("--logprobs and --choices: no answer is generated; each option's log-probability is in "
                           "the --json record's choices")
    if (explain or sheet is not None) and is_image(video):
        raise VideoQAError(f"{'--explain' if explain else '--sheet'}: about a video's frames; {video} is an image")


def attention(frames: list[dict]) -> None:
    """--explain on stderr, asked for (so --quiet keeps it): each frame's time, its share of the answer's attention
    and a bar (the largest share full)."""
    from videoqa.render import note
    from videoqa.sheet import clock

    if not frames or "attention" not in frames[0]:
        return note("--explain: no answer token was generated, so there is no attention to share out")
    top = max(frame["attention"] for frame in frames) or 1.0
    for frame in frames:
        bar = "█" * round(24 * frame["attention"] / top)
        print(f"{clock(frame['time']):>9}  {100 * frame['attention']:5.1f}%  {bar}", file=sys.stderr)


@app.command()
@shared_options
def chat(
    ctx: typer.Context,
    video: Annotated[
        Optional[Path], typer.Argument(help="Video or image file.", show_default=False, readable=False)
    ] = None,
    resume: Annotated[bool, typer.Option(
        "--continue", help="Go on with the last conversation in the history: its video (as it was read: window and "
        "frames), model and turns, none answered again.")] = False,
    no_log: NoLogOpt = False,
    given: dict = None,
    run: Run = None,
    reply: Reply = None,
    window=None,
) -> None:
    """Talk about a video (or a part of it) over several turns; the video is encoded once.

    On a terminal: line editing and history, Ctrl-C stops an answer, Ctrl-D or /exit leaves,
    /help lists the commands (/video PATH [START [END]], /image, /add PATH [START [END]] to bring another image or
    video into the conversation, /reset, /frames, /save, /set).
    With stdin piped: one question per line, one answer (or, with --json, one JSON object) per line.

    [bold]Examples[/bold]

      videoqa chat clip.mp4

      printf 'What happens?\\nWhy?\\n' | videoqa chat clip.mp4 --json
    """
    from videoqa.chat import Repl, run_interactive
    from videoqa.output import check_stdout
    from videoqa.questions import lines, stdin_bytes

    check_stdout()
    stdin = stdin_bytes()
    if is_stdin(video):
        raise VideoQAError(f"{video}: chat reads its questions from stdin, so the video cannot come from it too")
    last = None
    if resume:  # the last conversation's video, window, model and settings, from the history
        last, video, given, window, run = continued(ctx, video, given, window, run)
    found = checkpoint(run, given, cache=reply.cache)
    media = read_media(found, video, given, window)[0] if video is not None else None
    session = Repl(load(found, run), found.settings(**given), reply.json, log=not no_log)
    if media is not None:
        session.open(media)
    if last is not None:
        resumed(session, last)
    interactive = sys.stdin.isatty() and sys.stdout is not None and sys.stdout.isatty() and not reply.json
    code = run_interactive(session) if interactive else session.run(lines(stdin))
    raise typer.Exit(code)


VIDEO_GLOB = "*.mp4,*.mkv,*.mov,*.avi,*.webm,*.m4v,*.mpg,*.mpeg,*.flv,*.wmv"  # what caption finds in folders


class Format(str, Enum):
    jsonl = "jsonl"
    csv = "csv"


@app.command()
@shared_options
def caption(
    paths: Annotated[list[Path], typer.Argument(help="Video files and folders.", show_default=False, readable=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", metavar="<text>",
                                        help="The question asked of every video.")] = CAPTION_PROMPT,
    prompt_file: PromptFileOpt = None,
    out: OutOpt = None,
    fmt: Annotated[Format, typer.Option("--format", help="Record format.")] = Format.jsonl,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Walk folders recursively.")] = False,
    glob: Annotated[str, typer.Option(
        "--glob", metavar="<patterns>", show_default=False, help="File name patterns in folders, comma-separated "
        f"\\[default: {VIDEO_GLOB.replace(',', ', ')}].")] = VIDEO_GLOB,
    batch_size: BatchOpt = 4,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    log: LogOpt = False,
    ray: RayOpt = None,
    ray_workers: RayWorkersOpt = 1,
    given: dict = None,
    run: Run = None,
    window=None,
) -> None:
    """Caption (or question) many videos: one record per video, written as soon as it is done.

    A video that cannot be read gets a record with [bold]error[/bold] set and the run goes on.
    Exit codes: 0 all captioned (or skipped), 6 some failed, 7 all failed, 130 stopped by Ctrl-C,
    143 by SIGTERM, 129 by SIGHUP (each after writing the batch in flight).

    [bold]Examples[/bold]

      videoqa caption clips/ --out captions.jsonl

      videoqa caption clips/ -r --glob "*.mp4" --out captions.jsonl --resume

      videoqa caption a.mp4 b.mp4 --prompt "What sport is this?" --format csv > answers.csv

      videoqa caption /shared/clips --ray auto --out captions.jsonl --resume
    """
    from videoqa import caption as captioning
    from videoqa.questions import read_question
    from videoqa.records import Output, record_key

    question = read_question(prompt, prompt_file)
    videos = captioning.find_videos(paths, glob, recursive)
    if not videos:
        raise VideoQAError(f"no videos found in {', '.join(map(str, paths))} matching {glob}")
    output = Output(out, fmt.value, resume=resume, overwrite=overwrite, inputs=videos,
                    key=lambda rec: record_key(rec["video"]))
    if all(record_key(v) in output.done for v in videos):
        return summarize(captioning.Tally(skipped=len(videos)), "videos")
    found = checkpoint(run, given, cache=False, batch_size=batch_size, medium="video")
    log_records(log, output, found, given, "caption", window)
    on_ray = ray_options(ray, ray_workers)
    if on_ray is None:
        return write_records(found, run, output, "videos",
                             lambda model: captioning.run(model, videos, question, output, batch_size,
                                                          start=window.start, end=window.end, **given))
    write_records(found, run, output, "videos", lambda unloaded: captioning.run_on_ray(
        unloaded, videos, question, output, batch_size, ray=on_ray, start=window.start,
        end=window.end, **given), load_here=False)


def ray_options(address: str | None, workers: int) -> dict | None:
    """--ray's and --ray-workers' options for caption.on_ray (None without --ray); the extra checked first."""
    if address is None:
        return None
    from videoqa.cluster import ray_module

    ray_module()  # a missing extra is said before anything starts
    return {"address": None if address == "local" else address, "debug": DEBUG, "workers": workers}


def write_records(found, run: Run, output, unit: str, produce, *, load_here: bool = True) -> None:
    """Load the model (its video workload checked first), then let `produce(model)` write the records to `output`
    (opened after the load: a failed load leaves an old file untouched); print the summary and exit with the run's
    code. Not `load_here` (a cluster loads it): `produce` gets the checkpoint."""
    try:
        loaded = load(found, run) if load_here else found
        output.open()
        tally = produce(loaded)
    finally:
        output.close()
    summarize(tally, unit)
    raise typer.Exit(tally.exit_code())


def summarize(tally, unit: str) -> None:
    """Done, failed and skipped records, and how many `unit`s per second were answered."""
    from videoqa.render import summary

    answered = tally.done + tally.failed
    rate = f"{answered / (time.perf_counter() - tally.start):.2f}" if answered else "-"
    summary({"done": str(tally.done), "failed": str(tally.failed), "skipped": str(tally.skipped), f"{unit}/s": rate,
             **({"backed off": f"{tally.backoffs} times (out of memory)"} if tally.backoffs else {})})


@app.command("eval")
@shared_options
def evaluate(
    items: Annotated[Path, typer.Argument(help="Benchmark items: JSONL, or a JSON array.", show_default=False,
                                          readable=False)],
    mapping: Annotated[Optional[str], typer.Option(
        "--map", metavar="<field=key,...>", show_default=False,
        help="Which key of another layout holds each field (video, question, choices, answer, start, end), e.g. "
             "Video-MME's video=videoID,choices=options.")] = None,
    videos: Annotated[Optional[Path], typer.Option(
        "--videos", metavar="<dir>", show_default=False,
        help="Where relative video paths are \\[default: the items file's folder]; a name without a suffix is "
             "looked for as .mp4, .mkv, .webm, .avi, .mov.")] = None,
    by: Annotated[Optional[str], typer.Option(
        "--by", metavar="<field>", show_default=False,
        help="Also break the accuracy down by this field of the items (e.g. task_type, duration).")] = None,
    out: OutOpt = None,
    batch_size: BatchOpt = 4,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    log: LogOpt = False,
    ray: RayOpt = None,
    ray_workers: RayWorkersOpt = 1,
    given: dict = None,
    run: Run = None,
) -> None:
    """Answer a benchmark's questions: one JSONL record per item, written as soon as its batch is done.

    Each item: {"video", "question", "choices", "answer", "start", "end"}, all but the first two optional.
    With choices the answer is the option the model finds likeliest (as ask --choices); else it is generated.
    With an answer, records say [bold]correct[/bold]; the summary adds the accuracy and its 95% (Wilson) interval.
    Exit codes as caption's: 6 some items failed, 7 all failed, 130/143/129 stopped after the batch in flight.

    [bold]Examples[/bold]

      videoqa eval items.jsonl --out results.jsonl

      videoqa eval videomme.json --map video=videoID,choices=options --videos videos/ --by duration --out r.jsonl

      videoqa eval mvbench.json --map choices=candidates --out r.jsonl --resume
    """
    from videoqa import caption as captioning
    from videoqa import evaluation
    from videoqa.records import Output

    found_items = evaluation.read_items(items, evaluation.parse_map(mapping), videos=videos)
    evaluation.check_windows(items, found_items)
    output = Output(out, "jsonl", resume=resume, overwrite=overwrite, inputs=[items, *(i.video for i in found_items)],
                    key=lambda rec: rec["number"])
    todo = [item for item in found_items if item.number not in output.done]
    judged: list[dict] = []
    on_ray = ray_options(ray, ray_workers)

    def produce(subject):  # the model, or without it the checkpoint the cluster loads
        def answered(interrupted, stats):
            from videoqa.session import eval_jobs, judged as judge

            found = (subject.evaluate(todo, batch_size=batch_size, interrupted=interrupted, stats=stats, **given)
                     if on_ray is None else captioning.on_ray(
                         subject, lambda here: eval_jobs(here, todo, **given), batch_size=batch_size,
                         finish=lambda n, rec: judge(todo[n], rec), **on_ray)(interrupted, stats))
            for rec in found:
                judged.append(rec)
                yield rec

        return captioning.drain(answered, output, len(todo), skipped=len(found_items) - len(todo), what="evaluating")

    if not todo:
        summarize(captioning.Tally(skipped=len(found_items)), "items")
        return report_accuracy(evaluation.accuracy(evaluation.every_record(out, judged), by), by)
    try:
        found = checkpoint(run, given, cache=False, batch_size=batch_size, medium="video")
        log_records(log, output, found, given, "eval", {item.number: (item.start, item.end) for item in todo})
        write_records(found, run, output, "items", produce, load_here=on_ray is None)
    except typer.Exit:  # the run's end: its summary is out, the accuracy goes under it
        report_accuracy(evaluation.accuracy(evaluation.every_record(out, judged), by), by)
        raise


def report_accuracy(found, by: str | None) -> None:
    """The accuracy lines under the summary, on stderr: overall, then per value of --by."""
    from videoqa.render import note

    overall, groups = found
    if overall.total:
        note(overall.line())
    for value, accuracy in groups.items():
        note(f"{by} {value}: {accuracy.line()}")


def every_option(default: str):
    return Annotated[Optional[str], typer.Option(
        "--every", show_default=False, metavar="<length>",
        help=f"Segment length: 30, 10s, 2m or 1:30 (seconds unless a unit is given) \\[default: {default}].")]


class Cues(str, Enum):
    srt = "srt"
    vtt = "vtt"
    jsonl = "jsonl"
    md = "md"


SUFFIXES = {".srt": "srt", ".vtt": "vtt", ".jsonl": "jsonl", ".md": "md", ".markdown": "md"}


@app.command()
@shared_options
def timeline(
    video: Annotated[Path, typer.Argument(help="Video file.", show_default=False, readable=False)],
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", show_default=False, metavar="<text>",
        help="The question asked of each segment \\[default: the model's, \"Describe what happens in this part of "
        "the video.\"].")] = None,
    prompt_file: PromptFileOpt = None,
    every: every_option("30s") = None,
    segments: SegmentsOpt = None,
    out: OutOpt = None,
    fmt: Annotated[Optional[Cues], typer.Option(
        "--format", show_default=False, help="srt, vtt, jsonl or md \\[default: from --out's suffix, else jsonl].")] = None,
    batch_size: BatchOpt = 4,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    sheet: SheetOpt = None,
    log: LogOpt = False,
    ray: RayOpt = None,
    ray_workers: RayWorkersOpt = 1,
    given: dict = None,
    run: Run = None,
) -> None:
    """Describe a video segment by segment, with times: subtitles (SRT, WebVTT), JSONL records or Markdown.

    Each segment is written as soon as its batch is done; --resume continues an interrupted timeline. Exit codes
    as caption's: 6 some segments failed, 7 all failed, 130/143/129 stopped after the batch in flight.

    [bold]Examples[/bold]

      videoqa timeline film.mp4 --out film.srt

      videoqa timeline lecture.mp4 --every 2m --format md > lecture.md

      videoqa timeline film.mp4 --out film.vtt --resume

      videoqa timeline film.mp4 --every 1m --out film.srt --sheet film.png
    """
    from videoqa import caption as captioning
    from videoqa.questions import read_question
    from videoqa.records import Output
    from videoqa.session import segments as cut

    question = None if prompt is None and prompt_file is None else read_question(prompt, prompt_file)
    windows = cut(video, every=every, count=segments, default=30)
    form = fmt.value if fmt else SUFFIXES.get(out.suffix.lower(), "jsonl") if out else "jsonl"
    output = Output(out, form, resume=resume, overwrite=overwrite, inputs=[video], key=captioning.start_key)
    todo = [w for w in windows if captioning.start_key({"start": w.start}) not in output.done]
    if not todo:
        return summarize(captioning.Tally(skipped=len(windows)), "segments")
    on_ray = ray_options(ray, ray_workers)

    def produce(subject):  # the model, or without it the checkpoint the cluster loads
        from videoqa.session import segment_jobs, sheet as draw

        drawn: list[dict] = []  # the frames of the segments answered, for --sheet

        def jobs_of(here):
            chosen = here.settings(**given)
            return segment_jobs(here, video, question or here.preset.describe, chosen, windows=todo, default=30), chosen

        def answered(interrupted, stats):
            found = (subject.timeline(video, question, windows=todo, batch_size=batch_size, interrupted=interrupted,
                                      stats=stats, **given) if on_ray is None else captioning.on_ray(
                         subject, jobs_of, batch_size=batch_size, finish=lambda n, rec: {
                             **rec, "start": todo[n].start, "end": todo[n].end}, **on_ray)(interrupted, stats))
            for rec in found:
                drawn.extend(rec["frames"])
                yield rec

        tally = captioning.drain(answered, output, len(todo), skipped=len(windows) - len(todo), what="timeline")
        if sheet is not None and drawn:
            draw(video, sorted(drawn, key=lambda frame: frame["index"]), sheet)
        return tally

    found = checkpoint(run, given, cache=False, batch_size=batch_size, medium="video")
    log_records(log, output, found, given, "timeline")  # each record's window: its segment
    write_records(found, run, output, "segments", produce, load_here=on_ray is None)


@app.command()
@shared_options(settings=("frames", "fps", "max_frames"))
def find(
    video: Annotated[Path, typer.Argument(help="Video file.", show_default=False, readable=False)],
    query: Annotated[str, typer.Argument(help="What to look for, e.g. \"a dog jumps into the pool\".",
                                         show_default=False)],
    every: every_option("10s") = None,
    segments: SegmentsOpt = None,
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="How many segments to print, best first.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Every segment's start, end and score, as JSON.")] = False,
    batch_size: BatchOpt = 4,
    given: dict = None,
    run: Run = None,
) -> None:
    """Find the moments of a video that match a description, without generating text.

    Each segment is scored P(yes) / (P(yes) + P(no)) for "Does this part of the video show: QUERY? Answer yes or
    no.", from the model's next-token distribution. Exit codes: 6 some segments could not be read, 7 none.

    [bold]Examples[/bold]

      videoqa find holiday.mp4 "a dog jumps into the pool"

      videoqa find match.mp4 "a goal is scored" --every 5s --top 5 --json
    """
    from videoqa.output import check_stdout, display, print_json, write
    from videoqa.questions import read_question
    from videoqa.render import error, progress
    from videoqa.session import segments as cut
    from videoqa.windows import Window

    check_stdout()
    query = read_question(query, None)
    windows = cut(video, every=every, count=segments, default=10)
    found = checkpoint(run, {**given, "max_new_tokens": 1}, cache=False, batch_size=batch_size,
                       medium="video")  # no answer text
    loaded = load(found, run)
    with progress(f"Scoring {len(windows)} segments…"):
        scored = loaded.find(video, query, windows=windows, batch_size=batch_size,
                             **{name: given[name] for name in FRAMING})
    if json_output:
        print_json({"video": display(video), "query": query, "model": loaded.name, "segments": scored})
    else:
        best = sorted((s for s in scored if s["score"] is not None), key=lambda s: -s["score"])[:top]
        write("".join(f"{Window(s['start'], s['end']).label()}  {s['score']:.2f}\n" for s in best))
    failed = [s for s in scored if s["error"] is not None]
    if failed:
        first = failed[0]
        error(f"{len(failed)} of {len(scored)} segments could not be scored; "
              f"{Window(first['start'], first['end']).label()}: {first['error']}")
    raise typer.Exit(Exit.OK if not failed else Exit.ALL_FAILED if len(failed) == len(scored) else Exit.SOME_FAILED)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
@shared_options(settings=())
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on; another than loopback needs --api-key.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="VIDEOQA_API_KEY", show_default=False,
        help="Every request needs `Authorization: Bearer KEY` (also VIDEOQA_API_KEY).")] = None,
    allow: Annotated[Optional[list[Path]], typer.Option(
        "--allow", metavar="<dir>", show_default=False,
        help="A directory whose files requests may name by path or file:// URL (repeatable; data: URLs always).")
    ] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", min=1, help="New conversations that wait together answered in one batch, at most.")] = 4,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1, help="Seconds a request may take, waiting included (then 504).")] = 600,
    given: dict = None,
    run: Run = None,
) -> None:
    """An OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models, GET /health) that keeps the model
    loaded: images and videos as image_url / video_url parts.

    [bold]Examples[/bold]

      videoqa serve -m llava-onevision-0.5b --allow ~/videos

      curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": [{"type": "video_url",
      "video_url": {"url": "file:///home/me/videos/clip.mp4"}}, {"type": "text", "text": "What happens?"}]}]}'
    """
    from videoqa.render import note

    if host not in LOOPBACK and not api_key:
        raise VideoQAError(f"--host {host}: listening beyond this machine needs --api-key (or VIDEOQA_API_KEY)")
    try:
        import uvicorn

        from videoqa.serve import Limits, app as server
    except ImportError:
        raise VideoQAError("videoqa serve needs FastAPI and uvicorn: pip install 'videoqa[serve]'") from None
    directories = [d.expanduser() for d in allow or []]
    for directory in directories:
        if not directory.is_dir():
            raise VideoQAError(f"--allow {directory}: not a directory")
    loaded = load(checkpoint(run, given, cache=True, batch_size=batch_size), run)
    note(f"serving {loaded.name} on http://{host}:{port}/v1 (Ctrl-C stops)")
    limits = Limits(batch=batch_size, seconds=timeout)
    uvicorn.run(server(loaded, allow=directories, api_key=api_key, limits=limits), host=host, port=port,
                log_level="warning")


@app.command("doctor")
def doctor_command(
    device: DeviceOpt = Device.auto,
    max_memory: MaxMemoryOpt = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help='One JSON object: {"checks": [{"name", "status", "detail"}, ...], "ok": bool}.')] = False,
) -> None:
    """Why something will not work: versions, devices, decoding, caches, what fits.

    One line per check (ok, warning or problem): library versions, devices,
    PyAV writing and reading back a small video, the Hugging Face cache, the
    presets cached, the precision each preset fits at here (or --max-memory).

    Exit 0 when a default run can work; 1 when a check it needs is a problem:
    torch, transformers, video decoding, fits (no preset fits at any precision),
    or a CUDA device this torch has no kernels for.

    [bold]Examples[/bold]

      videoqa doctor

      videoqa doctor --json | jq -r '.checks[] | select(.status != "ok") | .name'

      videoqa doctor --max-memory 8GB
    """
    from videoqa import doctor
    from videoqa.output import print_json, write

    checks = doctor.run(device.value, max_memory, model=RUN_OPTIONS["model"][1])
    if json_output:
        print_json(doctor.report(checks))
    else:
        write(doctor.text(checks, colour=sys.stdout.isatty()))
    raise typer.Exit(Exit.OK if doctor.can_run(checks) else 1)


@app.command("models")
def models_command(
    device: DeviceOpt = Device.auto,
    max_memory: MaxMemoryOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per preset, one per line.")] = False,
) -> None:
    """The presets: where they come from, whether they are downloaded, and the memory each needs here.

    For a default question (the preset's frames, 256 new tokens) at float32, float16, bfloat16, int8, int4 (CPU) and
    nf4; a ✓
    where that fits the device's free memory now (or --max-memory). (auto) marks the precision `--dtype auto`
    picks here: the one `videoqa ask` uses, and the memory check it passes or fails ("ask").

    [bold]Examples[/bold]

      videoqa models

      videoqa models --json | jq -r 'select(.default_fits) | .name'

      videoqa models --max-memory 8GB
    """
    from videoqa.catalogue import rows
    from videoqa.output import print_json, write

    found, against = rows(device.value, max_memory)
    if json_output:
        for row in found:
            print_json(row)
        return
    write(table(found, against))


def table(found: list[dict], against: str) -> str:
    """The presets as a plain-text table (rich, to stdout)."""
    from rich.console import Console
    from rich.table import Table

    from videoqa.memory import size

    auto = found[0]["auto"] if found else ""
    quantized = "bfloat16" if "int4" in (found[0]["memory_bytes"] if found else {}) else auto  # int4: a CPU
    grid = Table(title=f"memory for a default question; ✓ where it fits ({against}); (auto): what `videoqa ask` "
                 f"uses here; nf4 over {auto}, int8 and int4 over {quantized}", title_justify="left")
    precisions = list(found[0]["memory_bytes"]) if found else []
    for column in ("preset", "architecture", "hub id", "downloaded",
                   *(f"{p} (auto)" if p == auto else p for p in precisions), "ask"):
        grid.add_column(column)
    for row in found:
        cells = [f"{size(row['memory_bytes'][p])} {'✓' if row['fits'][p] else '✗'}" for p in precisions]
        grid.add_row(row["name"], row["architecture"], row["repo"], size(row["disk_bytes"]) if row["cached"] else "no",
                     *cells, "fits" if row["default_fits"] else "too big")
    console = Console(width=220, record=True, file=open(os.devnull, "w"), color_system=None)
    console.print(grid)
    return console.export_text()


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


@app.command("logs")
def logs_command(
    count: Annotated[int, typer.Option("-n", "--count", min=0, help="How many answers, newest first; 0: all.")] = 10,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per answer, one per line.")] = False,
    search: Annotated[Optional[str], typer.Option(
        "--search", "-s", metavar="<text>", show_default=False,
        help="Only answers whose question or answer holds every word (a full-text index, FTS5).")] = None,
    video: Annotated[Optional[Path], typer.Option(
        "--video", metavar="<file>", show_default=False, readable=False,
        help="Only answers about this file, known by its content: a renamed or moved copy matches.")] = None,
) -> None:
    """The history: every answer of ask and chat (and, with --log, of caption, timeline and eval), newest first.

    Kept in $XDG_DATA_HOME/videoqa/logs.db (SQLite; default ~/.local/share/videoqa). --no-log keeps an answer out,
    VIDEOQA_LOG=0 every answer; `videoqa chat --continue` goes on with the last conversation.

    [bold]Examples[/bold]

      videoqa logs

      videoqa logs -n 3 --search "dog ball"

      videoqa logs --video clip.mp4 --json | jq -r .answer
    """
    from videoqa import history
    from videoqa.output import print_json, write
    from videoqa.render import note

    found = history.recent(count, search=search, video=video)
    if not found:
        return note("no answer in the history matches" if search is not None or video is not None else
                    f"the history is empty ({history.path()})")
    if json_output:
        for entry in found:
            print_json(entry)
        return
    write("\n".join(logged_entry(entry) for entry in found))


def logged_entry(entry: dict) -> str:
    """One answer of the history as text: a heading (number, local time, command, model, files, window, turn),
    the question and the answer (or error)."""
    from datetime import datetime

    from videoqa.names import display
    from videoqa.windows import Window

    when = datetime.fromisoformat(entry["time"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    files = []
    for medium in entry["media"]:
        relative = os.path.relpath(medium["path"])
        files.append(display(medium["path"] if relative.startswith("..") else relative))
    span = entry["window"]
    if span is not None:
        files.append(Window(span["start"] or 0.0, span["end"]).label())
    turn = [f"turn {entry['turn']}"] if entry["turn"] is not None else []
    heading = "  ".join([f"#{entry['id']}", when, entry["command"], entry["model"] or "-", *files, *turn])
    said = f"error: {entry['error']}" if entry["error"] else entry["answer"]
    indent = lambda text: text.strip().replace("\n", "\n   ")  # noqa: E731
    return f"{heading}\nQ: {indent(entry['question'])}\nA: {indent(said)}\n"


def log_records(log: bool, output, found, given: dict, command: str, window=None) -> None:
    """--log (caption, timeline, eval): each record written to `output` also goes into the history, with the
    settings it was answered with and its window: `window` (a Window), one per eval item number ((start, end)), or
    the record's own (a timeline segment's)."""
    if not log:
        return
    from videoqa import history
    from videoqa.windows import window as span

    write, settings = output.write, {}

    def logged(rec: dict) -> None:
        write(rec)
        if "settings" not in settings:  # the model is loaded (and resolved) by the first record
            settings["settings"] = found.settings(**given)
        where = window.get(rec.get("number"), (None, None)) if isinstance(window, dict) else window
        if isinstance(where, tuple):
            where = None if where == (None, None) else span(*where)
        history.log(rec, command=command, settings=settings["settings"], window=where)

    output.write = logged


def continued(ctx: typer.Context, video: Path | None, given: dict, window, run: Run):
    """chat --continue: the last conversation in the history, and what reopens it: its file, its settings under
    those given (its frames and window as it read them), its window, and the run with its model (unless --model
    names another: refused)."""
    from dataclasses import replace

    from videoqa import history
    from videoqa.names import display
    from videoqa.render import note
    from videoqa.windows import Window

    if video is not None:
        raise VideoQAError("--continue reopens the last conversation's own video: give no video with it")
    framing = [f"--{name.replace('_', '-')}" for name in FRAMING if given.get(name) is not None]
    if framing or not window.whole:
        options = ", ".join(framing + ([] if window.whole else ["--start/--end"]))
        raise VideoQAError(f"--continue reads the video as the conversation did: no {options}")
    last = history.last_conversation()
    if last is None or not last["media"] or not last["turns"]:
        raise VideoQAError(f"--continue: no chat conversation in the history ({display(history.path())}) yet")
    source = ctx.get_parameter_source("model")
    if source is None or source.name == "DEFAULT":
        run = replace(run, model=last["model"])
    elif run.model != last["model"]:
        raise VideoQAError(f"--continue: the last conversation was with {last['model']}, not {run.model}; give no "
                           "--model, or that one")
    medium = last["media"][0]
    path = Path(medium["path"])
    if not path.is_file():
        raise VideoQAError(f"--continue: {display(path)}, the last conversation's file, is gone", Exit.INPUT)
    if medium["hash"] and history.content_hash(path) != medium["hash"]:
        note(f"--continue: {display(path)} has changed since the conversation; its turns are restored as they were")
    logged = last["settings"]
    given = {**given, **{name: value for name, value in logged.items()
                         if name in given and (name in FRAMING or given[name] is None)}}
    span = last["window"] or {}
    return last, path, given, Window(span.get("start") or 0.0, span.get("end")), run


def resumed(session, last: dict) -> None:
    """Restore the conversation's turns into the chat just opened, and say so on stderr."""
    from videoqa.render import note

    session.resume(last)
    question = last["turns"][-1]["question"]
    question = question if len(question) <= 60 else f"{question[:59]}…"
    count = len(last["turns"])
    note(f"continuing the conversation: {count} turn{'' if count == 1 else 's'}, the last {question!r}")


def main() -> None:
    """Entry point: run the app; every failure is one line on stderr and a documented exit code."""
    sys.exit(run())


def run() -> int:
    from videoqa.output import OutputClosed
    from videoqa.render import show_notes

    global DEBUG
    DEBUG = os.environ.get("VIDEOQA_DEBUG") == "1"
    show_notes()
    try:
        return typer.main.get_command(app).main(args=ray_local(sys.argv[1:]), standalone_mode=False) or 0
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C
        return Exit.INTERRUPTED
    except typer.TyperException as e:  # bad usage, reported by typer's parser
        if isinstance(e, typer.BadParameter):  # typer validates through pydantic, whose prefix is noise here
            e.message = e.message.removeprefix("Value error, ")
        return failed(e.format_message(), Exit.USAGE)
    except VideoQAError as e:
        return failed(str(e), e.code)
    except (OutputClosed, BrokenPipeError):  # `| head -1`: end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # and let nothing flush into the closed pipe at exit
        return Exit.PIPE
    except Exception as e:
        return failed(f"internal error: {type(e).__name__}: {e}; run again with --debug for the traceback", Exit.INTERNAL)


def ray_local(args: list[str]) -> list[str]:
    """`--ray` with no address after it (at the end, before another option or a path) as `--ray local`: the
    address is optional, which the option parser cannot say itself."""
    found = []
    for n, arg in enumerate(args):
        found.append(arg)
        if arg == "--ray" and (n + 1 == len(args) or not RAY_ADDRESS.fullmatch(args[n + 1])):
            found.append("local")
    return found


def failed(message: str, code: int) -> int:
    """Say what went wrong in one line (after the traceback, with --debug); the documented exit code."""
    import traceback

    from videoqa.render import error

    if DEBUG:
        traceback.print_exc()
    if message:  # typer's parser has already shown the help when there is none
        error(" ".join(message.split()))
    return code
