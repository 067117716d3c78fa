"""`videoqa chat`: a REPL over one `videoqa.Chat` at a time, so a video is encoded once and each follow-up
prefills only itself.

Interactive on a terminal (readline editing, history across sessions, Ctrl-C stops an answer);
one question per line when stdin is a pipe.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from videoqa import output
from videoqa.errors import VideoQAError
from videoqa.frames import is_image
from videoqa.history import data_dir
from videoqa.output import Unwritable, print_json, stream
from videoqa.render import Interrupt, error, note, progress
from videoqa.session import Chat, Media, Model
from videoqa.settings import FRAMING, SPECS, Settings

HELP = """\
/video PATH [START [END]]  switch to another video, or a part of it (a new conversation)
/image PATH                ask about a still image instead
/add PATH [START [END]]    bring another image or video (or a part of it) into this conversation: the next
                           question is about it too; what was said is kept
/reset                     forget the conversation, keep the video
/frames                    the sampled frames: index and time
/save FILE                 save the conversation as Markdown (.md) or JSON (.json)
/sheet FILE                draw the sampled frames as a contact sheet (PNG), each labelled with its time
/set [KEY VAL]             show or change {settings} (frames, fps, max_frames: from the next /video;
                           fps none goes back to frames)
/help                      this list
/exit                      leave (or Ctrl-D)"""


def say(text: str) -> None:
    """What a slash command shows goes to stderr: stdout holds answers only (and stays valid JSON with --json)."""
    print(text, file=sys.stderr)


def parse_setting(settings: Settings, key: str, value: str) -> Settings:
    """A copy of `settings` with one option changed; bad keys and values raise with the accepted range."""
    key = key.replace("-", "_")
    if key not in SPECS:
        raise VideoQAError(f"/set: unknown setting {key!r}; settings: {', '.join(SPECS)}")
    try:
        return settings.changed(**{key: SPECS[key].parse(value)})
    except VideoQAError as e:
        raise VideoQAError(f"/set {e}") from None


class Repl:
    """The chat command over a session: the current conversation (a `videoqa.Chat`), its settings, the slash
    commands, and what is printed for each turn."""

    def __init__(self, model: Model, settings: Settings, json_output: bool, log: bool = True):
        self.model, self.settings, self.json_output = model, settings, json_output
        self.chat: Chat | None = None
        self.log, self.conversation, self.opened = log, None, {}  # the history: each turn logged, by conversation
        self.failed = 0  # exit code of the first line that failed
        self.interrupt: Interrupt | None = None  # on a terminal: Ctrl-C stops the answer at the next token

    def open(self, media: Path | Media, start: str | None = None, end: str | None = None) -> None:
        """A new conversation about a video (its window [start, end), if given) or image (read here unless it
        already is)."""
        if not isinstance(media, Media):
            with progress("Reading frames…"):
                media = self.model.media(media, **self.framing(), start=start, end=end)
        with progress("Encoding frames…"):
            self.chat = self.model.chat(media, **self.framing())
        self.opened = self.framing()  # what the history says the media was read with

    def framing(self) -> dict:
        """How the next video's frames are chosen: by time when `fps` is set, else the frame count."""
        fps = self.settings.fps
        return {"frames": None if fps is not None else self.settings.frames, "fps": fps,
                "max_frames": self.settings.max_frames}

    def ask(self, question: str) -> None:
        if self.chat is None:
            raise VideoQAError("no video yet: /video PATH (or /image PATH) first")
        answered = len(self.chat.answers)
        settings = {**{name: self.settings.get(name) for name in SPECS if name not in FRAMING},
                    "stop": self.settings.stop}
        if self.json_output:
            with progress("Answering…"):
                answer = self.chat.ask(question, **settings)
            print_json({**answer.record(), "turn": len(self.chat.answers)})
        else:
            stop = (lambda: self.interrupt.requested) if self.interrupt else (lambda: False)
            stream(self.chat.stream(question, **settings), stop, waiting=progress("Reading the prompt…"))
        if self.log and len(self.chat.answers) > answered:  # a turn stopped early is dropped, and not logged
            self.log_turn()

    def log_turn(self) -> None:
        """The turn just answered, into the history; a conversation's first turn starts a new conversation id."""
        from videoqa import history

        if len(self.chat.answers) == 1 or self.conversation is None:
            self.conversation = history.new_conversation()
        frames, answer = self.chat.media.frames, self.chat.answers[-1]
        history.log(answer.record(), command="chat", settings={
            **history.settings_of(self.settings), **self.opened}, conversation=self.conversation,
            turn=len(self.chat.answers), window=frames.window if frames else None, media=answer.media)

    def resume(self, conversation: dict) -> None:
        """Go on with a conversation from the history (`history.last_conversation()`) about the file open now:
        its turns restored as they were answered, none generated, each file a turn brought (/add) added back
        before it (read whole); the next turns are logged under its id."""
        import os

        self.chat.reset()
        seen = {os.path.abspath(self.chat.media.path)}
        for turn in conversation["turns"]:
            for medium in turn.get("media", []):
                if medium["path"] not in seen:
                    seen.add(medium["path"])
                    with progress("Reading frames…"):
                        self.chat.add(Path(medium["path"]), **self.framing())
            self.chat.take(turn["question"], turn["tokens"] or [])
        self.conversation = conversation["conversation"]

    def turns(self) -> list[dict]:
        return [{**a.record(), "turn": n} for n, a in enumerate(self.chat.answers if self.chat else [], 1)]

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        try:
            name, *args = shlex.split(line[1:]) or [""]
        except ValueError as e:  # unbalanced quotes
            raise VideoQAError(f"{line.strip()}: {e}") from None
        if name in ("exit", "quit"):
            return False
        if name == "add" and 1 <= len(args) <= 3:
            self.add(Path(args[0]).expanduser(), *args[1:])
        elif name == "video" and 1 <= len(args) <= 3 or name == "image" and len(args) == 1:
            path = Path(args[0]).expanduser()
            if is_image(path) != (name == "image"):
                raise VideoQAError(f"/{name} {path}: " + ("not an image (jpg, png, webp, ...): /video PATH"
                                                          if name == "image" else "an image: /image PATH"))
            self.open(path, *args[1:])
            say(self.loaded())
        elif name == "reset" and not args:
            if self.chat is None:
                raise VideoQAError("/reset: no video yet, nothing to forget")
            self.chat.reset()
        elif name == "frames" and not args:
            self.show_frames()
        elif name == "save" and len(args) == 1:
            self.save(Path(args[0]).expanduser())
        elif name == "sheet" and len(args) == 1:
            if self.chat is None:
                raise VideoQAError("/sheet: no video yet, no frames to draw")
            width, height = self.chat.sheet(Path(args[0]).expanduser())
            say(f"wrote {args[0]}: {width} × {height}")
        elif name == "set" and len(args) in (0, 2):
            if args:
                self.settings = parse_setting(self.settings, *args)
            say(self.settings.show())
        elif name == "help":
            say(HELP.format(settings=", ".join(SPECS)))
        else:
            raise VideoQAError(f"unknown command or arguments: {line.strip()} (/help lists the commands)")
        return True

    def add(self, path: Path, start: str | None = None, end: str | None = None) -> None:
        """/add: another video (its window) or image joins the conversation, or opens one when none is."""
        if self.chat is None:
            self.open(path, start, end)
            return say(self.loaded())
        with progress("Reading frames…"):
            media = self.model.media(path, **self.framing(), start=start, end=end)
        with progress("Encoding frames…"):
            self.chat.add(media)
        say("added " + described(media, "the next question is about it too"))

    def loaded(self) -> str:
        """What /video or /image has loaded: the file, and a video's frames and window, or an image's size."""
        return described(self.chat.media, "a new conversation")

    def show_frames(self) -> None:
        if self.chat is None or self.chat.video is None:
            raise VideoQAError("no video is loaded: /frames lists a video's sampled frames")
        for frame in self.chat.video.frames.listed():
            say(f"frame {frame['index']:>6}  {frame['time']:8.3f} s")

    def save(self, path: Path) -> None:
        if path.suffix not in (".md", ".json"):
            raise VideoQAError(f"/save {path}: use a .md or .json file name")
        form = output.conversation_json if path.suffix == ".json" else output.markdown
        turns = self.turns()
        text = form(self.model.name, self.chat.media.path if self.chat else None, turns)
        try:
            path.write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            raise VideoQAError(f"/save {path}: {e.strerror}") from None
        say(f"saved {len(turns)} turn{'' if len(turns) == 1 else 's'} to {path}")

    def handle(self, line: str) -> bool:
        """One line of input; errors are reported and the session goes on. False means leave."""
        line = line.strip()
        try:
            if line.startswith("/"):
                return self.command(line)
            if line:
                self.ask(line)
        except Unwritable:
            raise
        except VideoQAError as e:
            error(str(e))
            self.failed = self.failed or e.code
        return True

    def run(self, lines: Iterable[str]) -> int:
        """Read lines to the end; the exit code is that of the first failed line, if any."""
        for line in lines:
            if not self.handle(line):
                break
        return self.failed


def described(media: Media, what: str) -> str:
    """A file as /video, /image and /add report it: a video's frames and window, or an image's size; then `what`
    became of it."""
    name = output.display(media.path)
    if media.frames is None:
        return f"image {name}: {media.image.width} × {media.image.height} ({what})"
    frames, window = media.frames, media.frames.window
    part = "the whole video" if window.whole else window.label()
    span = f"{frames.times[0]:.2f}–{frames.times[-1]:.2f} s" if frames.times else "no frame"
    return f"video {name}: {len(frames.indices)} frames of {part} ({span}; {what})"


class History:
    """The readline history file; a location that cannot be used is a note, and the session goes on without it."""

    def __init__(self, readline):
        self.readline, self.file = readline, data_dir() / "history"
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            if self.file.exists():
                readline.read_history_file(self.file)
            readline.set_history_length(1000)
            readline.write_history_file(self.file)  # trimmed to the last 1000
        except OSError as e:
            note(f"no chat history: {output.display(self.file)} cannot be used ({e.strerror or e})")
            self.file = None

    def add(self) -> None:
        """Keep the line just entered, at once: a crash loses nothing."""
        if self.file is not None:
            try:
                self.readline.append_history_file(1, self.file)
            except OSError:
                self.file = None


def interactive_lines() -> Iterator[str]:
    """Lines from a readline prompt; each is added to the history file as soon as it is entered.
    Ctrl-C at the prompt clears the line, Ctrl-D ends."""
    import readline

    history = History(readline)
    while True:
        try:
            line = input("> ")
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return
        if line.strip():
            history.add()
        yield line


def run_interactive(chat: Repl) -> int:
    """The terminal REPL: a Ctrl-C during an answer stops it and returns to the prompt. Leaving is exit code 0
    whatever failed on the way (each failure said so at once; the first-failure code is for piped input)."""
    print("videoqa chat: ask about the video, /help for commands, Ctrl-D to leave.", file=sys.stderr)
    for line in interactive_lines():
        try:
            with Interrupt() as chat.interrupt:
                if not chat.handle(line):
                    break
        except KeyboardInterrupt:
            print("[stopped]", file=sys.stderr)
    return 0

