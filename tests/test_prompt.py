"""Prompt ids against the reference ids in shared/REFERENCE.md, and the splice."""

import pytest
import torch

from conftest import build_tokenizer, needs_assets
from videoqa.models import presets
from videoqa.prompt import prompt_ids, splice

TEMPLATE = "USER: {media}\n{question} ASSISTANT:"
# shared/REFERENCE.md: `USER: <video>\nWhy is this video funny? ASSISTANT:` with the placeholder counted once.
REFERENCE_IDS = [1, 3148, 1001, 29901, 29871, 32001, 13, 11008, 338, 445, 4863, 2090, 1460, 29973, 319, 1799, 9047,
                 13566, 29901]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@needs_assets
def test_prompt_ids_equal_the_reference(tokenizer):
    assert prompt_ids(tokenizer, TEMPLATE, "Why is this video funny?", [("<video>", 1)], "<video>") == REFERENCE_IDS


@needs_assets
def test_placeholder_expands_to_frames_times_257(tokenizer):
    ids = prompt_ids(tokenizer, TEMPLATE, "Why is this video funny?", [("<video>", 8 * 257)], "<video>")
    assert len(ids) == 2074  # REFERENCE.md: the expanded prompt is 2074 ids
    assert ids[:5] == REFERENCE_IDS[:5] and ids[5 : 5 + 2056] == [32001] * 2056 and ids[2061:] == REFERENCE_IDS[6:]


def test_splice_writes_features_in_order_over_the_placeholders():
    embed = torch.nn.Embedding(10, 2)
    ids = torch.tensor([[1, 7, 7, 7, 3]])
    features = torch.tensor([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])
    out = splice(embed, ids, features, (7,))
    assert torch.equal(out[0, 1:4], features)
    assert torch.equal(out[0, [0, 4]], embed(torch.tensor([1, 3])))


def test_splice_places_both_kinds_in_order_and_skips_the_rows_a_cache_holds():
    embed = torch.nn.Embedding(10, 2)
    ids = torch.tensor([[1, 8, 8, 3, 7, 2, 8]])  # an image (8) of two rows, a video (7) of one, another image
    features = torch.tensor([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0], [40.0, 41.0]])
    whole = splice(embed, ids, features, (7, 8))
    assert torch.equal(whole[0, [1, 2, 4, 6]], features)
    later = splice(embed, ids, features, (7, 8), past=3)  # the first image is in the cache: its rows are skipped
    assert later.shape[1] == 4 and torch.equal(later[0, [1, 3]], features[2:])
    assert torch.equal(later[0, [0, 2]], embed(torch.tensor([3, 2])))


# shared/REFERENCE.md, LLaVA-NeXT-Video: <video> = 32000, "What is shown in this video?", placeholder counted once.
NEXT_VIDEO_IDS = [1, 3148, 1001, 29901, 29871, 32000, 13, 5618, 338, 4318, 297, 445, 4863, 29973, 319, 1799, 9047,
                  13566, 29901]


@needs_assets
def test_next_video_prompt_ids_equal_the_reference(tmp_path):
    tokenizer = build_tokenizer(tmp_path, ("<video>", "<image>"), pad="<unk>")
    template = presets()["llava-next-video-7b"].template
    assert prompt_ids(tokenizer, template, "What is shown in this video?", [("<video>", 1)], "<video>") == NEXT_VIDEO_IDS
    expanded = prompt_ids(tokenizer, template, "What is shown in this video?", [("<video>", 8 * 144)], "<video>")
    assert len(expanded) == 18 + 1152 and expanded[5 : 5 + 1152] == [32000] * 1152
