"""`videoqa eval ITEMS`: one record per item with caption's crash-safe appending, --resume, batching and exit codes;
multiple-choice items scored as `ask --choices` scores them (against transformers' model forward), open ones
generated (against `generate`); `correct`, the accuracy with its 95% interval, `--by`; Video-MME and MVBench layouts
through `--map` (the worked example of the README, on tests/data)."""

import json
from pathlib import Path

import pytest

from conftest import ASSETS, asset, assert_clean_failure, needs_assets, reference_generate, reference_logprob
from conftest import reference_net, reference_pixels, reference_prompt
from videoqa.errors import Exit
from videoqa.frames import read_frames

pytestmark = needs_assets
DATA = Path(__file__).parent / "data"
VIDEOS = ASSETS / "videos"
SPORT = ["tennis", "golf", "a soccer ball game on grass"]


def write_items(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture
def items(tmp_path) -> Path:
    return write_items(tmp_path / "items.jsonl", [
        {"video": "videollava_sample_demo_1.mp4", "question": "Which sport is this?", "choices": SPORT,
         "answer": "golf", "task": "sport"},
        {"video": "videollava_sample_demo_3.mp4", "question": "What happens?", "task": "open"},
        {"video": "missing.mp4", "question": "What happens?", "answer": "nothing", "task": "open"},
        {"video": "videollava_sample_demo_1.mp4", "question": "Which sport is this?", "choices": SPORT,
         "answer": "B", "start": 2, "end": 8, "task": "sport"},
    ])


def run_eval(cli, items: Path, model: Path, out: Path, *args):
    result = cli("eval", items, "--videos", VIDEOS, "-m", model, "--frames", 2, "-n", 4, "--out", out, *args)
    return result, [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def test_records_scores_and_accuracy(cli, tiny_model, items, tmp_path):
    result, records = run_eval(cli, items, tiny_model, tmp_path / "out.jsonl", "--by", "task")
    assert result.code == Exit.SOME_FAILED and result.out == ""  # the missing video: its error record
    assert [r["number"] for r in records] == [1, 2, 3, 4]
    chosen, open_ended, missing, windowed = records
    net, tokenizer = reference_net(tiny_model)
    frames = read_frames(asset("videos/videollava_sample_demo_1.mp4"), 2)
    ids = reference_prompt(net, tokenizer, frames, "Which sport is this?")
    pixels = reference_pixels(net, list(frames.pixels))[None]
    for option in chosen["choices"]:
        assert abs(option["logprob"] - reference_logprob(net, ids, option["tokens"], pixel_values_videos=pixels)) < 1e-4
    best = max(chosen["choices"], key=lambda option: option["logprob"])["text"]
    assert chosen["answer"] == best and chosen["correct"] == (best == "golf") and chosen["expected"] == "golf"
    assert windowed["correct"] == (windowed["answer"] == "golf")  # "B": the second option, by its position
    assert all(2 <= f["time"] < 8 for f in windowed["frames"])
    second = read_frames(asset("videos/videollava_sample_demo_3.mp4"), 2)
    assert open_ended["tokens"] == reference_generate(tiny_model, second, "What happens?", 4)
    assert open_ended["correct"] is None and "choices" not in open_ended  # no expected answer
    assert missing["error"] and missing["correct"] is None and missing["item"]["task"] == "open"
    judged = [r["correct"] for r in records if r["correct"] is not None]
    right = sum(judged)
    assert f"accuracy {right / len(judged):.1%} ({right}/{len(judged)}), 95% CI" in result.err
    assert f"task sport: accuracy {right / 2:.1%} ({right}/2)" in result.err


def test_batches_and_resume_lose_and_repeat_nothing(cli, tiny_model, items, tmp_path):
    _, alone = run_eval(cli, items, tiny_model, tmp_path / "alone.jsonl", "-b", 1)
    _, batched = run_eval(cli, items, tiny_model, tmp_path / "batched.jsonl", "-b", 3)
    strip = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    assert list(map(strip, batched)) == list(map(strip, alone))
    out = tmp_path / "crashed.jsonl"
    lines = (tmp_path / "alone.jsonl").read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:40])  # a crash in the middle of the second entry
    result, records = run_eval(cli, items, tiny_model, out, "--resume")
    assert result.code == Exit.SOME_FAILED and "skipped  1" in " ".join(result.err.split("│"))
    assert [r["number"] for r in records] == [1, 2, 3, 4]
    assert list(map(strip, records)) == list(map(strip, alone))


def test_video_mme_layout_through_map(cli, tiny_model, tmp_path):
    """The README's worked example: Video-MME's own keys, videos named by id without a suffix, letter answers."""
    result, records = run_eval(cli, DATA / "videomme_sample.json", tiny_model, tmp_path / "mme.jsonl",
                               "--map", "video=videoID,choices=options", "--by", "task_type")
    items = json.loads((DATA / "videomme_sample.json").read_text())
    assert result.code == 0 and len(records) == len(items)
    for record, item in zip(records, items):
        assert Path(record["video"]).name == item["videoID"] + ".mp4" and record["answer"] in item["options"]
        letter = "ABCD"[item["options"].index(record["answer"])]
        assert record["correct"] == (letter == item["answer"]) and record["item"]["question_id"] == item["question_id"]
    assert "task_type Counting Problem: accuracy" in result.err


def test_mvbench_layout_with_windows(cli, tiny_model, tmp_path):
    result, records = run_eval(cli, DATA / "mvbench_sample.json", tiny_model, tmp_path / "mvb.jsonl",
                               "--map", "choices=candidates")
    items = json.loads((DATA / "mvbench_sample.json").read_text())
    assert result.code == 0
    for record, item in zip(records, items):
        assert record["correct"] == (record["answer"] == item["answer"])
        if "start" in item:
            assert all(item["start"] <= f["time"] < item["end"] for f in record["frames"])


def test_bad_input_is_one_line(cli, tiny_model, tmp_path):
    items = write_items(tmp_path / "items.jsonl", [{"video": "a.mp4", "question": "Q?"}])
    assert_clean_failure(cli("eval", items, "-m", tiny_model, "--map", "clip=videoID"), Exit.USAGE, "--map", "clip")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"video": "a.mp4", "question": "Q?"}\nnot json\n')
    assert_clean_failure(cli("eval", broken, "-m", tiny_model), Exit.INPUT, "broken.jsonl:2")
    backwards = write_items(tmp_path / "backwards.jsonl", [{"video": "a.mp4", "question": "Q?", "start": 5,
                                                            "end": 2}])
    assert_clean_failure(cli("eval", backwards, "-m", tiny_model), Exit.INPUT, "backwards.jsonl:1", "end")
