"""videoqa: ask local video-language models about video files.

    import videoqa

    model = videoqa.load("video-llava-7b")                      # every CLI load option, as keywords
    answer = model.ask("clip.mp4", "Why is this video funny?")  # .text .tokens .frames .timings .record()
    for piece in model.stream("clip.mp4", "What happens?"):
        print(piece, end="")

`import videoqa` is instant: torch and transformers are imported when a model is first resolved or loaded.
"""

from videoqa.errors import Exit, VideoQAError

__version__ = "0.1.0"

_LAZY = {
    "load": "videoqa.session",
    "Checkpoint": "videoqa.session",
    "Model": "videoqa.session",
    "Chat": "videoqa.session",
    "Answer": "videoqa.session",
    "Media": "videoqa.session",
    "segments": "videoqa.session",
    "Window": "videoqa.windows",
    "window": "videoqa.windows",
    "Family": "videoqa.families",
    "Videos": "videoqa.families",
    "register": "videoqa.families",
    "family": "videoqa.families",
}
__all__ = ["Exit", "VideoQAError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'videoqa' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
