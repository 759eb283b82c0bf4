"""CLIP tokenizer: ids must equal OpenAI CLIP's exactly.

Where the expected ids come from: OpenAI's own tokenizer (``clip.simple_tokenizer`` and
``clip.tokenize`` from the ``clip-anytorch`` 2.6.0 wheel, a packaging of github.com/openai/CLIP),
run in a throwaway venv with ftfy 6.3.1 (the project's version: ftfy decides how mojibake is
repaired, so a different ftfy major could legitimately change the mojibake case). open_clip 3.3.0
gave the same ids for every caption except the literal special-token one, which it does not
treat as special (OpenAI does, and so do IRRA/RDE, which copied OpenAI's tokenizer).
"""
import pytest
import torch

from utils.tokenizer import EOT_ID, SOT_ID, SimpleTokenizer, get_tokenizer, tokenize, tokenize_batch

SENTENCE = ("The pedestrian walks along the street wearing a long grey overcoat, dark trousers, "
            "brown leather shoes and holds a black umbrella in the right hand.")
SENTENCE_IDS = [518, 18256, 8192, 2528, 518, 2012, 3309, 320, 1538, 5046, 1658, 7356, 267, 3144, 23172, 267, 2866, 5862, 4079, 537, 7286, 320, 1449, 17143, 530, 518, 1155, 2463, 269]
LONG_CAPTION = " ".join([SENTENCE] * 3)  # 87 BPE tokens: longer than 77 with SOT/EOT

# (caption, OpenAI's SimpleTokenizer().encode(caption))
REFERENCE_IDS = [
    ('A woman wearing a black jacket, blue jeans and white sneakers.',
     [320, 2308, 3309, 320, 1449, 6164, 267, 1746, 10157, 537, 1579, 17397, 269]),
    ("The man is wearing a red T-shirt and carrying a person's backpack; he's walking fast.",
     [518, 786, 533, 3309, 320, 736, 339, 268, 2523, 537, 9920, 320, 2533, 568, 14894, 282, 797, 568, 3941, 1953, 269]),
    ('  Extra   whitespace\tand\nnewlines\r\n here  ',
     [4231, 4699, 2138, 537, 1218, 3418, 763]),
    ('She wears a caf\xc3\xa9-colored coat',
     [1043, 11869, 320, 15304, 268, 11775, 7356]),
    ('The girl wore a na\xefve caf\xe9 r\xe9sum\xe9 scarf \xe0 la mode, \xdcber-cool.',
     [518, 1611, 8953, 320, 1097, 35689, 563, 15304, 29106, 7054, 4166, 13365, 21259, 1210, 6493, 267, 6522, 1516, 268, 2077, 269]),
    ('Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt; &amp;amp; &quot;quoted&quot; &#39;x&#39;',
     [2435, 261, 9164, 283, 321, 285, 8911, 34308, 321, 285, 261, 257, 27706, 257, 262, 343, 262]),
    ('He has 2 bags, 3.5 kg each, costs $120.99 (approx) -- 100% sure!!! #1 @home',
     [797, 791, 273, 6136, 267, 274, 269, 276, 7817, 2416, 267, 7628, 259, 272, 273, 271, 269, 280, 280, 263, 18266, 264, 2432, 272, 271, 271, 260, 1650, 995, 258, 272, 287, 1137]),
    ('A person \U0001f600 with an umbrella \u2602\ufe0f and \u2764 heart',
     [320, 2533, 7334, 593, 550, 17143, 1741, 224, 1001, 537, 2720, 1936]),
    ('\u4e00\u4e2a\u7a7f\u7740\u7ea2\u8272\u8863\u670d\u7684\u5973\u4eba, \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4',
     [19759, 222, 19759, 103, 163, 102, 123, 163, 251, 222, 163, 118, 95, 164, 231, 110, 164, 94, 96, 19277, 235, 163, 248, 226, 29290, 111, 21078, 374, 267, 39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, 15197, 250, 31871, 255, 31625, 368]),
    ("I'm sure they've said we'll go; she'd, you're, it's, don't, PERSON'S, Person\u2019s",
     [328, 880, 1650, 889, 1200, 1946, 649, 1342, 861, 282, 1043, 1896, 267, 592, 982, 267, 585, 568, 267, 847, 713, 267, 2533, 568, 267, 2533, 568]),
    ("Mixed CASE WORDS like McDonald's and iPhone-12 and e-mail.",
     [6780, 2068, 2709, 789, 10741, 568, 537, 4314, 268, 272, 273, 537, 324, 268, 2614, 269]),
    ('',
     []),
    ('   ',
     []),
    ('<|startoftext|>hi<|endoftext|> there',
     [49406, 1883, 49407, 997]),
    (LONG_CAPTION, SENTENCE_IDS * 3),
    ('Pedestrian, 20-30yo; hair: long/black; top=white; bottom=jeans; shoes?sneakers...',
     [18256, 267, 273, 271, 268, 274, 271, 3497, 282, 2225, 281, 1538, 270, 1449, 282, 1253, 284, 1579, 282, 5931, 284, 10157, 282, 4079, 286, 17397, 678]),
    ('tab\xa0nbsp and zero\u200bwidth and soft\xadhyphen',
     [14724, 6459, 4393, 537, 5848, 9844, 23571, 537, 3773, 22618, 1441, 745, 576]),
]

# OpenAI clip.tokenize([LONG_CAPTION], context_length=77, truncate=True)[0]
LONG_CAPTION_77 = [49406, 518, 18256, 8192, 2528, 518, 2012, 3309, 320, 1538, 5046, 1658, 7356, 267, 3144, 23172, 267, 2866, 5862, 4079, 537, 7286, 320, 1449, 17143, 530, 518, 1155, 2463, 269, 518, 18256, 8192, 2528, 518, 2012, 3309, 320, 1538, 5046, 1658, 7356, 267, 3144, 23172, 267, 2866, 5862, 4079, 537, 7286, 320, 1449, 17143, 530, 518, 1155, 2463, 269, 518, 18256, 8192, 2528, 518, 2012, 3309, 320, 1538, 5046, 1658, 7356, 267, 3144, 23172, 267, 2866, 49407]


def _padded(ids, length):
    return ids + [0] * (length - len(ids))


@pytest.mark.parametrize("caption,expected", REFERENCE_IDS, ids=range(len(REFERENCE_IDS)))
def test_encode_matches_openai(caption, expected):
    assert get_tokenizer().encode(caption) == expected


# Captions that fit in 77 tokens with SOT/EOT (truncation has its own test).
FITTING_IDS = [(c, e) for c, e in REFERENCE_IDS if len(e) + 2 <= 77]


@pytest.mark.parametrize("caption,expected", FITTING_IDS, ids=range(len(FITTING_IDS)))
def test_tokenize_matches_openai_layout(caption, expected):
    out = tokenize(caption)
    assert out.dtype == torch.long and out.shape == (77,)
    assert out.tolist() == _padded([SOT_ID] + expected + [EOT_ID], 77)


def test_truncation_keeps_eot_last():
    out = tokenize(LONG_CAPTION, 77, truncate=True)
    assert out.tolist() == LONG_CAPTION_77
    assert out[-1].item() == EOT_ID
    assert out.argmax().item() == 76  # features are read at argmax: it must be the EOT
    assert out[1:76].tolist() == (SENTENCE_IDS * 3)[:75]


def test_too_long_without_truncation_raises():
    with pytest.raises(ValueError, match=r"89 tokens.*text_length=77"):
        tokenize(LONG_CAPTION, 77, truncate=False)


def test_text_length_168_fits_long_caption():
    out = tokenize(LONG_CAPTION, 168, truncate=False)
    assert out.shape == (168,)
    assert out.tolist() == _padded([SOT_ID] + SENTENCE_IDS * 3 + [EOT_ID], 168)
    assert out.argmax().item() == 88


def test_empty_caption_is_sot_eot_then_padding():
    out = tokenize("", 77)
    assert out[:2].tolist() == [SOT_ID, EOT_ID]
    assert out[2:].eq(0).all()
    assert tokenize(" \n\t ", 5).tolist() == [SOT_ID, EOT_ID, 0, 0, 0]


def test_exact_fit_is_not_truncated():
    ids = REFERENCE_IDS[0][1]  # 13 ids -> 15 with SOT/EOT
    assert tokenize(REFERENCE_IDS[0][0], 15, truncate=False).tolist() == [SOT_ID] + ids + [EOT_ID]
    assert tokenize(REFERENCE_IDS[0][0], 14).tolist() == [SOT_ID] + ids[:12] + [EOT_ID]


def test_bad_text_length_raises():
    with pytest.raises(ValueError, match="text_length"):
        tokenize("a person", 1)


def test_tokenize_batch_stacks_rows():
    caps = [REFERENCE_IDS[0][0], "", LONG_CAPTION]
    out = tokenize_batch(caps, 77)
    assert out.shape == (3, 77) and out.dtype == torch.long
    for row, cap in zip(out, caps):
        assert row.tolist() == tokenize(cap, 77).tolist()
    assert tokenize_batch([], 168).shape == (0, 168)


def test_decode_inverts_encode_up_to_cleaning():
    tok = get_tokenizer()
    assert tok.decode(tok.encode("A woman,  wearing a RED coat.")) == "a woman , wearing a red coat . "
    assert tok.decode([SOT_ID, 320, EOT_ID]) == "<|startoftext|>a <|endoftext|>"


def test_vocabulary_and_cache():
    tok = get_tokenizer()
    assert tok.vocab_size == 49408
    assert tok.encoder["<|startoftext|>"] == SOT_ID and tok.encoder["<|endoftext|>"] == EOT_ID
    assert get_tokenizer() is tok
    assert isinstance(tok, SimpleTokenizer)


def test_missing_vocab_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6"):
        SimpleTokenizer(str(tmp_path / "bpe_simple_vocab_16e6.txt.gz"))
