"""`videoqa chat` on a real pseudo-terminal: prompt, streaming answer, Ctrl-C back to the prompt, history."""

import os
import sys

import pytest

from conftest import asset, needs_assets

pytestmark = needs_assets


def spawn(tiny_model, tmp_path, *args, env=None):
    import pexpect

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", **(env or {})}
    command = [sys.executable, "-m", "videoqa", "chat", str(asset("videos/videollava_sample_demo_1.mp4")),
               "-m", str(tiny_model), *args]
    return pexpect.spawn(command[0], command[1:], env=env, encoding="utf-8", timeout=120, dimensions=(50, 200))


def test_prompt_streaming_ctrl_c_and_history(tiny_model, tmp_path):
    child = spawn(tiny_model, tmp_path, "-n", "3500")  # a long answer, to interrupt
    child.expect_exact("> ")
    child.sendline("Why is this video funny?")
    child.expect_exact("Why is this video funny?\r\n")  # the terminal's echo
    child.expect(r"\S{3}")  # answer text streams while the answer is still being generated
    child.sendintr()  # Ctrl-C
    child.expect_exact("[stopped]")
    child.expect_exact("> ")  # the session goes on
    child.sendline("/set max_new_tokens 3")
    child.expect_exact("max_new_tokens 3")
    child.expect_exact("> ")
    child.sendline("And now?")
    child.expect_exact("> ")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "data" / "videoqa" / "history").read_text()
    assert "Why is this video funny?" in history and "And now?" in history

    child = spawn(tiny_model, tmp_path, "-n", "2")  # a new session recalls the last question with up-arrow
    child.expect_exact("> ")
    child.send("\x1b[A")
    child.expect_exact("And now?")
    child.sendline("")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pytest.importorskip("pexpect").EOF)


@pytest.mark.parametrize("where", ["a file", "under /proc", "history is a folder"])
def test_an_unusable_history_location_is_a_note_and_chat_goes_on(tiny_model, tmp_path, where):
    import pexpect

    data = {"a file": tmp_path / "data", "under /proc": "/proc/videoqa-data", "history is a folder": tmp_path / "d"}
    if where == "a file":
        (tmp_path / "data").write_text("")
    if where == "history is a folder":
        (tmp_path / "d" / "videoqa" / "history").mkdir(parents=True)
    child = spawn(tiny_model, tmp_path, "-n", "2", env={"XDG_DATA_HOME": str(data[where])})
    child.expect_exact("no chat history")
    child.expect_exact("> ")
    child.sendline("Why?")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_leaving_after_a_failed_command_is_exit_0_on_a_terminal(tiny_model, tmp_path):
    """The first-failure exit code is for piped input: on a terminal each failure was said at once."""
    import pexpect

    child = spawn(tiny_model, tmp_path, "-n", "2")
    child.expect_exact("> ")
    child.sendline("/bogus")
    child.expect_exact("unknown command")
    child.expect_exact("> ")
    child.sendline("/set top_p 7")
    child.expect_exact("top_p")
    child.expect_exact("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_the_spinner_names_each_stage(tiny_model, tmp_path):
    """On a terminal, what runs before the answer is named as it runs: the imports, the model, its weights."""
    import pexpect

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    command = ["-m", "videoqa", "ask", str(asset("videos/videollava_sample_demo_1.mp4")), "Why?",
               "-m", str(tiny_model), "-n", "2"]
    child = pexpect.spawn(sys.executable, command, env=env, encoding="utf-8", timeout=120, dimensions=(50, 200))
    for label in ("Importing torch and transformers", "Finding ", "Loading the weights of "):
        child.expect_exact(label)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
