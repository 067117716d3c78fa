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
    INTERRUPTED = 130


class VideoQAError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with `code`."""

    def __init__(self, message: str, code: Exit = Exit.USAGE):
        super().__init__(message)
        self.code = code
