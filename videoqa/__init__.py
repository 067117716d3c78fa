"""videoqa: ask local video-language models about video files."""

__version__ = "0.1.0"
