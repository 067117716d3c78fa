"""`videoqa eval`'s pure side: benchmark files read into items, answers judged, accuracy with a Wilson interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from videoqa.errors import Exit, VideoQAError
from videoqa.evaluation import FIELDS, Accuracy, Item, accuracy, judge, parse_map, read_items, wilson

DATA = Path(__file__).parent / "data"
VIDEOS = Path(__file__).parents[2] / "shared" / "assets" / "videos"
needs_videos = pytest.mark.skipif(not VIDEOS.is_dir(), reason="../shared/assets/videos is not beside the checkout")
Z = 1.959963984540054


def write_jsonl(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def refusal(path: Path, mapping: dict | None = None) -> str:
    """read_items' error message, checked to be one line with the input exit code."""
    with pytest.raises(VideoQAError) as caught:
        read_items(path, mapping)
    assert caught.value.code == Exit.INPUT
    message = str(caught.value)
    assert "\n" not in message
    return message


# parse_map


def test_parse_map_names_the_source_key_of_each_field():
    assert parse_map("video=videoID,question=question,choices=options") == {
        "video": "videoID", "question": "question", "choices": "options"}
    assert parse_map(" video = videoID , choices=candidates ") == {"video": "videoID", "choices": "candidates"}
    assert parse_map(None) == {}


@pytest.mark.parametrize("spec, problem", [
    ("x=y", "x is not one of video, question, choices, answer, start or end"),
    ("video", "give FIELD=KEY pairs separated by commas"),
    ("video=", "give FIELD=KEY pairs separated by commas"),
    ("=videoID", "give FIELD=KEY pairs separated by commas"),
    ("video=a,", "give FIELD=KEY pairs separated by commas"),
    ("", "give FIELD=KEY pairs separated by commas"),
    ("video=a,video=b", "video is mapped twice"),
])
def test_parse_map_refuses_a_bad_spec_as_usage(spec, problem):
    with pytest.raises(VideoQAError) as caught:
        parse_map(spec)
    assert caught.value.code == Exit.USAGE
    assert str(caught.value) == f"--map {spec!r}: {problem}" + (
        ", e.g. video=videoID,choices=options" if problem.startswith("give") else "")


# read_items


def test_jsonl_items_are_numbered_by_line_and_resolved_against_the_file(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    first = {"video": "a.mp4", "question": "What sport?", "choices": ["tennis", "golf"], "answer": "golf",
             "start": 1.5, "end": "0:10", "extra": 7}
    second = {"video": "/elsewhere/b.mkv", "question": "Why?", "answer": 3, "start": 2}
    items = read_items(write_jsonl(tmp_path / "items.jsonl", first, "", "  ", second))
    assert items == [
        Item(1, tmp_path / "a.mp4", "What sport?", ("tennis", "golf"), "golf", 1.5, "0:10", first),
        Item(4, Path("/elsewhere/b.mkv"), "Why?", None, "3", 2.0, None, second),
    ]
    assert isinstance(items[1].start, float)


def test_a_json_array_is_numbered_by_position_and_videos_resolve_against_the_given_folder(tmp_path):
    path = tmp_path / "items.json"
    path.write_text('  \n[\n{"video": "x.mp4", "question": "Q1"},\n\n{"video": "y.mp4", "question": "Q2",'
                    ' "choices": [1, 2.5, "three"]}]')
    items = read_items(path, videos=tmp_path / "clips")
    assert [(item.number, item.video, item.question) for item in items] == [
        (1, tmp_path / "clips" / "x.mp4", "Q1"), (2, tmp_path / "clips" / "y.mp4", "Q2")]
    assert items[1].choices == ("1", "2.5", "three")
    assert items[0].choices is items[0].answer is items[0].start is items[0].end is None


def test_a_mapping_reads_fields_from_other_keys_and_keeps_the_original_object(tmp_path):
    row = {"videoID": "v.mp4", "question": "Which?", "options": ["A. x", "B. y"], "answer": "B", "video": "no.mp4",
           "task_type": "Counting Problem"}
    [item] = read_items(write_jsonl(tmp_path / "items.jsonl", row), {"video": "videoID", "choices": "options"})
    assert (item.video, item.choices, item.answer) == (tmp_path / "v.mp4", ("A. x", "B. y"), "B")
    assert item.fields == row


def test_a_video_named_without_a_suffix_is_found_with_the_first_known_suffix_that_exists(tmp_path):
    for name in ("clip.webm", "clip.avi", "other.mov", "dotted.v2.mkv"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "bare").write_bytes(b"")
    lines = [{"video": name, "question": "Q"} for name in ("clip", "other", "bare", "gone", "gone.mp4", "dotted.v2")]
    items = read_items(write_jsonl(tmp_path / "items.jsonl", *lines))
    assert [item.video.name for item in items] == ["clip.webm", "other.mov", "bare", "gone", "gone.mp4", "dotted.v2"]


def test_a_required_field_missing_names_the_line_and_the_key_looked_for(tmp_path):
    path = write_jsonl(tmp_path / "items.jsonl", {"videoID": "a", "question": "Q"}, {"question": "Q"})
    assert refusal(path, {"video": "videoID"}) == (
        f'{path}:2: no "videoID" (the video; --map video=KEY names another key)')
    path = write_jsonl(tmp_path / "items.jsonl", {"video": "a"})
    assert refusal(path) == f'{path}:1: no "question" (the question; --map question=KEY names another key)'


def test_errors_in_a_json_array_name_the_item_by_its_position(tmp_path):
    path = tmp_path / "items.json"
    path.write_text(json.dumps([{"video": "a", "question": "Q"}, {"video": "a", "question": "Q"}, {"question": "Q"}]))
    assert refusal(path) == f'{path}: item 3: no "video" (the video; --map video=KEY names another key)'
    path.write_text(json.dumps([{"video": "a", "question": "Q"}, ["a", "Q"]]))
    assert refusal(path) == f"{path}: item 2: not a JSON object (a list)"


NOT_CHOICES = '"choices" (the choices) must be a list of two or more texts'


@pytest.mark.parametrize("row, problem", [
    ({"video": 3, "question": "Q"}, '"video" (the video) must be non-empty text, not 3'),
    ({"video": "a", "question": "  "}, '"question" (the question) must be non-empty text, not "  "'),
    ({"video": "a", "question": "Q", "choices": ["only"]}, NOT_CHOICES),
    ({"video": "a", "question": "Q", "choices": "a|b"}, NOT_CHOICES),
    ({"video": "a", "question": "Q", "choices": ["a", None]}, NOT_CHOICES),
    ({"video": "a", "question": "Q", "answer": 1.5}, '"answer" (the answer) must be text or a whole number'),
    ({"video": "a", "question": "Q", "answer": True}, '"answer" (the answer) must be text or a whole number'),
    ({"video": "a", "question": "Q", "end": [1]}, '"end" (the end) must be seconds or [HH:]MM:SS text'),
    ("[1, 2]", "not a JSON object (a list)"),
    ('"text"', "not a JSON object (a string)"),
    ('{"video": "a",', "not JSON (Expecting property name enclosed in double quotes, column 15)"),
])
def test_a_bad_line_is_refused_naming_the_file_and_line(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "items.jsonl", {"video": "a", "question": "Q"}, row)
    assert refusal(path) == f"{path}:2: {problem}"


def test_a_mapped_key_is_named_in_a_type_error(tmp_path):
    path = write_jsonl(tmp_path / "items.jsonl", {"video": "a", "question": "Q", "options": ["x"]})
    assert refusal(path, {"choices": "options"}) == (
        f'{path}:1: "options" (the choices) must be a list of two or more texts')


def test_a_json_array_that_does_not_parse_names_the_line_of_the_problem(tmp_path):
    path = tmp_path / "items.json"
    path.write_text('[\n{"video": "a", "question": "Q"}\n{"video": "b", "question": "Q"}\n]')
    assert refusal(path) == f"{path}:3: not JSON (Expecting ',' delimiter, column 1)"


@pytest.mark.parametrize("text", ["", "\n  \n", "[]", " [ ] "])
def test_a_file_without_items_is_refused(tmp_path, text):
    path = tmp_path / "items.jsonl"
    path.write_text(text)
    assert refusal(path) == f"{path}: no items"


def test_an_unreadable_file_is_refused(tmp_path):
    absent = tmp_path / "absent.jsonl"
    assert refusal(absent) == f"{absent}: cannot read it (No such file or directory)"
    assert refusal(tmp_path) == f"{tmp_path}: cannot read it (Is a directory)"
    (tmp_path / "latin1.jsonl").write_bytes(b'{"video": "caf\xe9", "question": "Q"}\n')
    assert refusal(tmp_path / "latin1.jsonl") == f"{tmp_path / 'latin1.jsonl'}: not UTF-8 text"
    (tmp_path / "object.json").write_text('{"video": "a", "question": "Q"}\n{"video": "b"')
    assert refusal(tmp_path / "object.json").startswith(f"{tmp_path / 'object.json'}:2: not JSON (")


def test_a_leading_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "items.json"
    path.write_bytes(b'\xef\xbb\xbf[{"video": "a.mp4", "question": "Q"}]')
    assert [item.question for item in read_items(path)] == ["Q"]


@needs_videos
def test_the_video_mme_sample_reads_with_its_mapping():
    items = read_items(DATA / "videomme_sample.json", parse_map("video=videoID,choices=options"), videos=VIDEOS)
    assert len(items) == 3
    for item in items:
        assert item.video.exists() and item.video.suffix == ".mp4"
        assert item.video.stem == item.fields["videoID"]
        assert item.choices == tuple(item.fields["options"]) and len(item.choices) == 4
        assert item.answer in "ABCD" and item.question == item.fields["question"]
        assert item.start is item.end is None
        assert set(item.fields) == {"video_id", "duration", "domain", "sub_category", "url", "videoID",
                                    "question_id", "task_type", "question", "options", "answer"}
    assert len({item.fields["task_type"] for item in items}) == 3


@needs_videos
def test_the_mvbench_sample_reads_with_its_mapping():
    items = read_items(DATA / "mvbench_sample.json", parse_map("choices=candidates"), videos=VIDEOS)
    assert [item.video for item in items] == [VIDEOS / item.fields["video"] for item in items]
    assert all(item.video.exists() for item in items)
    for item in items:
        assert item.choices == tuple(item.fields["candidates"]) and item.answer in item.choices
    assert [(item.start, item.end) for item in items] == [(None, None), (None, None), (5.0, 20.0)]


def test_the_samples_answers_are_judged_correct_when_the_expected_option_is_chosen():
    for name, mapping in (("videomme_sample.json", "video=videoID,choices=options"),
                          ("mvbench_sample.json", "choices=candidates")):
        for item in read_items(DATA / name, parse_map(mapping)):
            right = [option for option in item.choices if judge(item.answer, option, item.choices)]
            assert len(right) == 1, (name, item.number)


# judge


def test_no_expected_answer_is_not_judged():
    assert judge(None, "anything", None) is None
    assert judge(None, "golf", ["tennis", "golf"]) is None


@pytest.mark.parametrize("answer, given, expected", [
    ("golf", "golf", True),
    ("Golf.", " golf ", True),  # casefolded, whitespace and trailing punctuation stripped
    ("golf!?", "GOLF;", True),
    ("tennis", "golf", False),
])
def test_with_choices_the_chosen_text_equal_to_the_answer_is_correct(answer, given, expected):
    assert judge(answer, given, ["tennis", "golf"]) is expected


VIDEO_MME = ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."]


@pytest.mark.parametrize("answer, given, expected", [
    ("C", "C. Berries.", True),  # Video-MME: the answer is the option's letter
    ("(C)", "C. Berries.", True),
    ("C.", "C. Berries.", True),
    (" C ", "C. Berries.", True),
    ("B", "C. Berries.", False),
    ("c", "C. Berries.", False),  # letters are capitals
    ("CC", "C. Berries.", False),
    ("C. Berries.", "C. Berries.", True),  # the whole option's text
])
def test_with_labelled_choices_a_letter_answer_names_the_option_by_its_label(answer, given, expected):
    assert judge(answer, given, VIDEO_MME) is expected


@pytest.mark.parametrize("answer, given, expected", [
    ("A", "tennis", True),  # unlabelled options: the letter is the position, A the first
    ("(B)", "golf", True),
    ("C.", "soccer", True),
    ("B", "tennis", False),
    ("D", "soccer", False),
    ("A", "cricket", False),  # no such option
])
def test_with_unlabelled_choices_a_letter_answer_names_the_option_by_its_position(answer, given, expected):
    assert judge(answer, given, ["tennis", "golf", "soccer"]) is expected


def test_a_label_outranks_the_position():
    reordered = ["(B) Candles", "(A) Apples"]
    assert judge("A", "(A) Apples", reordered) is True
    assert judge("A", "(B) Candles", reordered) is False  # first in position, but labelled B


def test_a_label_is_a_letter_then_a_dot_and_a_space_or_in_parentheses():
    choices = ["U.S. Army", "U.K. Navy"]
    assert judge("A", "U.S. Army", choices) is True  # "U.S." is no label: the position counts
    assert judge("U", "U.S. Army", choices) is False


@pytest.mark.parametrize("answer, given, expected", [
    ("yes", "Yes, it is.", True),  # the answer, then a character that is no letter or digit
    ("yes", "yes", True),
    ("Yes.", "  YES  ", True),
    ("a dog", "A dog!", True),
    ("two", "two - maybe three", True),
    ("no", "Nothing", False),
    ("no", "No1", False),
    ("yes", "I think yes", False),
    ("cat", "dog", False),
    ("", "anything", False),
])
def test_without_choices_the_answer_must_be_the_text_or_its_first_word(answer, given, expected):
    assert judge(answer, given, None) is expected


# wilson and accuracy


def by_formula(correct: int, total: int) -> tuple[float, float]:
    p, n = correct / total, total
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return centre - half, centre + half


def test_wilson_matches_the_formula_and_a_published_value():
    assert wilson(5, 8) == pytest.approx(by_formula(5, 8))
    assert wilson(5, 8) == pytest.approx((0.30574, 0.86316), abs=1e-5)
    low, high = wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)  # the example of Wikipedia's binomial CI article


def test_wilson_at_the_edges():
    z2 = Z**2
    assert wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # 0/n: [0, z²/(n+z²)]
    assert wilson(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(5, 8, z=1.0) == pytest.approx((0.44914, 0.77308), abs=1e-5)  # z = 1: by hand, 0.6111 ± 0.1620


def test_accuracy_line():
    assert Accuracy(5, 8).line() == "accuracy 62.5% (5/8), 95% CI 30.6–86.3%"
    assert Accuracy(5, 8).value == 0.625 and Accuracy(5, 8).interval == wilson(5, 8)
    assert Accuracy(0, 0).line() == "accuracy 0.0% (0/0), 95% CI 0.0–100.0%"


def record(correct, **item):
    return {"correct": correct, "item": item}


def test_accuracy_counts_only_judged_records_overall_and_by_field():
    records = [
        record(True, task_type="Counting Problem"),
        record(False, task_type="Counting Problem"),
        record(True, task_type="Action Recognition"),
        record(None, task_type="OCR Problems"),  # an error record, or an item without an answer
        {"item": {"task_type": "OCR Problems"}},
        record(True),
        {"correct": False},
    ]
    overall, groups = accuracy(records, by="task_type")
    assert overall == Accuracy(3, 5)
    assert groups == {"(none)": Accuracy(1, 2), "Action Recognition": Accuracy(1, 1),
                      "Counting Problem": Accuracy(1, 2)}
    assert list(groups) == ["(none)", "Action Recognition", "Counting Problem"]
    assert accuracy(records) == (Accuracy(3, 5), {})


def test_accuracy_groups_by_the_values_text_in_sorted_order():
    records = [record(True, n=10), record(False, n=2), record(True, n=2), record(True, n=None)]
    overall, groups = accuracy(records, by="n")
    assert list(groups.items()) == [("(none)", Accuracy(1, 1)), ("10", Accuracy(1, 1)), ("2", Accuracy(1, 2))]
    assert accuracy([], by="n") == (Accuracy(0, 0), {})


def test_fields_are_the_items_keys():
    assert FIELDS == ("video", "question", "choices", "answer", "start", "end")
