"""The one exception users see, and the exit codes it maps to (documented in the README)."""

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: run again with --debug and report the traceback
    USAGE = 2  # a bad option or question
    INPUT = 3  # the video or image cannot be read
    MODEL = 4  # the model cannot be found or loaded
    DEVICE = 5  # the requested device is not available
    SOME_FAILED = 6  # caption: some videos failed (their records carry the error)
    ALL_FAILED = 7  # caption: every video failed
    MEMORY = 8  # the run does not fit the device's memory (checked before loading), or ran out of it
    HANGUP = 129  # caption stopped by SIGHUP, after the batch in flight (128 + the signal's number)
    INTERRUPTED = 130  # Ctrl-C
    PIPE = 141  # stdout's reader went away (`| head -1`): the run ends quietly, as cat does
    TERMINATED = 143  # caption stopped by SIGTERM, after the batch in flight


class VideoQAError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with `exit_code`."""

    def __init__(self, message: str, code: Exit = Exit.USAGE):
        super().__init__(message)
        self.code = code

    @property
    def exit_code(self) -> int:
        return int(self.code)
