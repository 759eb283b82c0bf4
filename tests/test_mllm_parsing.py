"""Parsers on a corpus of messy, real-style MLLM outputs."""
from __future__ import annotations

import logging

import pytest

from utils.mllm.parsing import ParseStats, parse_lines, parse_vqa, parse_yes_no

YES_NO = [
    ("Yes", True), ("No", False), ("yes", True), ("NO", False),
    ("Yes.", True), ("No.", False), ("Yes!", True),
    ("**Yes**", True), ("**No**, the shirt is blue.", False), ("__Yes__", True),
    ('"Yes"', True), ("'No'", False), ("“Yes”", True), ("`No`", False),
    ("  \n\nYes", True), ("\nNo\n", False),
    ("Yes, the text accurately describes the image.", True),
    ("No, her eyes are hidden", False),  # the release counted this as Yes
    ("No, the person is not wearing a yes-branded hat.", False),
    ("Yes. The man wears a black jacket.", True),
    ("Answer: Yes", True), ("Answer: **No**", False), ("(Yes)", True), ("[No]", False),
    ("# Yes", True), ("> No", False),
    ("The text does not match the image.", None),
    ("I cannot determine that.", None), ("Nope", None), ("Not really.", None),
    ("Yesterday she wore a coat.", None), ("Nobody is there.", None),
    ("", None), ("   ", None), ("...", None), (None, None), ("是", None),
]


@pytest.mark.parametrize("text,expected", YES_NO)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


def test_release_bug_fixed():
    answer = "No, her eyes are hidden"
    assert "yes" in "No, her eyes are hidden".lower()  # why the release's substring test failed
    assert parse_yes_no(answer) is False
    assert parse_yes_no("No, she is not wearing eyes-catching yes shoes") is False


VQA_ANSWER = """Sure! Here are the answers to your questions:

1. The person is female.
2. She has long black hair. It is tied into a ponytail.
3.The person is wearing a white short-sleeved T-shirt
4) **Blue jeans** with long trouser legs.
**5.** No, there are no visible patterns on her clothes.
6. The shoes are not clearly visible.
7. Yes, the person wears black-framed glasses.
8. No.
9. The person is holding a red umbrella
   in her right hand.
10. Yes, she carries a black backpack. The style cannot be determined.
11. Cannot be determined.
12. Unknown
13. The person is walking. Her face is unclear.
14. The background is a city street with shops.
15. no, there are no other people in the background."""

VQA_EXPECTED = [
    "The person is female.",
    "She has long black hair. It is tied into a ponytail.",
    "The person is wearing a white short-sleeved T-shirt.",
    "Blue jeans with long trouser legs.",
    "There are no visible patterns on her clothes.",
    "The person wears black-framed glasses.",
    "The person is holding a red umbrella in her right hand.",
    "She carries a black backpack.",
    "The person is walking.",
    "The background is a city street with shops.",
    "There are no other people in the background.",
]


def test_parse_vqa_full_answer():
    assert parse_vqa(VQA_ANSWER) == VQA_EXPECTED


@pytest.mark.parametrize("text,expected", [
    ("1. male", ["Male."]),
    ("1.male\n2.short hair", ["Male.", "Short hair."]),
    ("1) The person is male.\n2) Short black hair.", ["The person is male.", "Short black hair."]),
    ("**1.** Female\n**2.** Long hair", ["Female.", "Long hair."]),
    ("1. **Gender:** Female", ["Female."]),
    ("1. Yes. The person wears a cap.", ["The person wears a cap."]),
    ("1. No - the person has no bag.", ["The person has no bag."]),
    ("1. Yes\n2. No\n3.", []),
    ("7. Does this person wear glasses? If clearly visible, what are the color and style? "
     "Yes, black sunglasses.", ["Black sunglasses."]),  # the model echoed question 7
    ("10. Backpack:\n   - Color: black\n   - Style: leather",
     ["Backpack: Color: black; Style: leather."]),
    ("6. The person is wearing white sneakers, but the brand is not visible.",
     ["The person is wearing white sneakers."]),
    ("10. Yes, a black backpack; its style is unclear.", ["A black backpack."]),
    ("6. White sneakers. The brand is not visible.", ["White sneakers."]),
    ("14. N/A", []),
    ("14. It is not possible to determine the background.", []),
    ("The person is male.\nhe has short hair\n\n", ["The person is male.", "He has short hair."]),
    ("- The person is male.\n- Black coat", ["The person is male.", "Black coat."]),
    ("", []), ("   \n \n", []), (None, []),
    ("1. The person is female!\n2. Is she happy?", ["The person is female.", "Is she happy."]),
])
def test_parse_vqa_cases(text, expected):
    assert parse_vqa(text) == expected


def test_parse_vqa_release_keeps_only_first_sentence_we_keep_all():
    out = parse_vqa("3. The person wears a grey coat. The coat is long. It has a hood.")
    assert out == ["The person wears a grey coat. The coat is long. It has a hood."]


@pytest.mark.parametrize("text,expected", [
    ("The man wears a black coat.\nThe man has short hair.",
     ["The man wears a black coat.", "The man has short hair."]),
    ("Here are the sub-sentences:\n1. A man.\n2) A woman.\n- A child.\n* A dog.\n• A cat.",
     ["A man.", "A woman.", "A child.", "A dog.", "A cat."]),
    ('"The person is male."\n\n\'He wears jeans.\'', ["The person is male.", "He wears jeans."]),
    ("**A man in red.**\nA man in red.\na  MAN in red.", ["A man in red."]),
    ("(1) First rewrite.\n(2) Second rewrite.", ["First rewrite.", "Second rewrite."]),
    ("", []), (None, []), ("\n\n - \n", []),
])
def test_parse_lines(text, expected):
    assert parse_lines(text) == expected


def test_parse_stats_counts_and_logs_first_failures(caplog):
    stats = ParseStats(max_logged=2)
    with caplog.at_level(logging.WARNING, logger="utils.mllm.parsing"):
        for answer in ["Yes", "maybe", "No", "hmm", "dunno", "Yes."]:
            stats.record("loc", parse_yes_no(answer) is not None, answer)
        stats.record("vqa", bool(parse_vqa("1. male")), "1. male")
    assert stats.summary() == {"loc": {"ok": 3, "failed": 3}, "vqa": {"ok": 1, "failed": 0}}
    assert stats.examples["loc"] == ["maybe", "hmm"]
    assert len([r for r in caplog.records if "unparseable" in r.getMessage()]) == 2
