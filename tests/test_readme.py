"""The README's quick start, run as far as it runs offline: `videoqa models` as written, each `videoqa ask` with
the tiny checkpoint in place of the preset it names (nothing is downloaded in tests) and a real video for
clip.mp4; and the install lines it promises: the pinned CPU torch and PyTorch's CPU wheel index."""

import json
import shlex
from pathlib import Path

from conftest import asset, needs_assets

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> list[list[str]]:
    block = README.read_text().split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_quick_start_installs_torch_for_the_cpu():
    lines = [" ".join(words) for words in quick_start()]
    assert "python3 -m venv .venv && . .venv/bin/activate" in lines
    assert "pip install torch==2.13.0" in lines and "pip install -e ." in lines
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in README.read_text()


def test_models_runs_as_written(cli):
    for words in quick_start():
        if words[:2] == ["videoqa", "models"]:
            result = cli(*words[1:])
            assert result.code == 0 and "llava-onevision-0.5b" in result.out and "(auto)" in result.out, result


@needs_assets
def test_the_questions_run_with_the_tiny_checkpoint(cli, tiny_model):
    asked = [words for words in quick_start() if words[:2] == ["videoqa", "ask"]]
    assert len(asked) == 2 and "-m" in asked[0] and "-m" not in asked[1]  # a laptop's model, then the default
    for words in asked:
        args = [str(asset("videos/videollava_sample_demo_1.mp4")) if w == "clip.mp4" else w for w in words[1:]]
        if "-m" in args:
            args[args.index("-m") + 1] = str(tiny_model)
        else:
            args += ["-m", str(tiny_model)]
        result = cli(*args, "-n", 3, "--json")
        assert result.code == 0 and json.loads(result.out)["question"] == "Why is this video funny?", result


@needs_assets
def test_the_python_example_runs(tiny_model, capsys):
    code = README.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"llava-onevision-0.5b"', repr(str(tiny_model)))
    code = code.replace('"clip.mp4"', repr(str(asset("videos/videollava_sample_demo_1.mp4"))))
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
