"""The command line itself: instant help with examples, no heavy imports at start-up."""

import subprocess
import sys


def test_help_lists_commands_and_exit_codes(cli):
    result = cli("--help")
    assert result.code == 0 and "ask" in result.out and "Exit codes" in result.out


def test_ask_help_has_examples(cli):
    result = cli("ask", "--help")
    assert result.code == 0 and 'videoqa ask clip.mp4 "Why is this video funny?"' in result.out


def test_start_up_does_not_import_torch_or_transformers():
    code = "import sys, videoqa.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
