"""Streaming text: the deltas join up to exactly the decoded answer, multi-byte characters included."""

import pytest

from conftest import build_tokenizer, needs_assets
from videoqa.output import texts


@needs_assets
@pytest.mark.parametrize(
    "text", ["The video is funny because the baby reads.", "Crème brûlée, 日本語 and 🎬 emoji!\nNew line  two spaces"]
)
def test_deltas_join_to_the_full_decode(tmp_path, text):
    tokenizer = build_tokenizer(tmp_path)
    ids = tokenizer(text, add_special_tokens=False).input_ids + [2]
    deltas = list(texts(ids, tokenizer))
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas) and len(deltas) > 5
