"""Prompt templates of ICL (versioned).

T_LOC, T_VQA and T_AGGR keep the released wording byte for byte (the published LoRA weights
were tuned on it, stray whitespace included); T_DEC and T_RWT are this project's own templates
for RDA's decomposition and rewriting. Change any wording -> bump PROMPT_VERSION, which is part
of every cache key, so old answers are not reused for new prompts.
"""
from __future__ import annotations

PROMPT_VERSION = "icl-1"

SYSTEM = "You are a helpful assistant."

# Anchor localization (THI step 1): does the caption describe the candidate image?
T_LOC = 'Can this text accurately describe the image?\n\nText: {caption}\n\nAnswer "Yes" or "No".'

# The 15 human-centred questions of the paper's supplement (THI step 2).
VQA_QUESTIONS = (
    "The person is male or female?",
    "What hairstyle does the person have, such as hair length and color?",
    "What is this person wearing on his upper body? If clearly visible, what are the color, "
    "type, and sleeve length?",
    "What are the characteristics of this person's pants? If clearly visible, what are the "
    "color, type, and trouser leg length?",
    "Does this person have any patterns on his/her clothes or pants?",
    "What are the characteristics of this person's shoes? If clearly visible, what are the "
    "color and style?",
    "Does this person wear glasses? If clearly visible, what are the color and style?",
    "Is this person wearing a scarf? If clearly visible, what are the color and style?",
    "Does this person have something in his/her hand? If so, what is it and what color is it?",
    "Does this person carry a backpack? If clearly visible, what are the color and style?",
    "Does this person wear a hat? If clearly visible, what are the color and style?",
    "Is this person wearing a belt or waistband?",
    "What is this person doing?",
    "What is the background?",
    "Are there other people in the background of this person?",
)

T_VQA = ("According to the pedestrian image, answer the following questions one by one:\n\n"
         + "\n".join(f"{i}. {q}" for i, q in enumerate(VQA_QUESTIONS, start=1)))

# Aggregation (THI step 3). The release's second line holds four spaces; kept on purpose.
T_AGGR = (
    "Aggregate the following subtexts into continuous and concise text sentences.\n"
    "    \n"
    "Example:\n"
    "Subtexts: ['The person is wearing a black jacket with a white stripe on the sleeve.', "
    "'The person is male.', 'The person has short brown hair.', 'The person is wearing a "
    "sleeveless striped shirt and a green tank top.', 'The person is wearing green pants.', "
    "'The person is wearing green pants.', 'The person is wearing a red scarf around their "
    "neck.', 'The person is wearing a red hat on their head.', 'The background is an outdoor "
    "area with some structures and other people.']\n"
    "Output: The man has short brown hair and is wearing a black jacket with a white stripe on "
    "the sleeve, a sleeveless striped shirt, a green tank top, green pants, a red scarf around "
    "his neck, and a red hat. The background features an outdoor area with some structures and "
    "other people.\n"
    "\n"
    "Now let's get started.\n"
    "Subtexts: {subtexts}\n"
    "\n"
    "Output aggregated sentences without any explanation."
)

# Our decomposition prompt (RDA): one complete sentence per attribute, one per line.
T_DEC = (
    "Split the following description of a pedestrian into independent attribute sub-sentences. "
    "Each sub-sentence must be a complete sentence about exactly one attribute of the person "
    "(for example gender, hair, upper clothing, lower clothing, shoes, accessories, carried "
    "items, action or background). Write one sub-sentence per line, without numbering and "
    "without any explanation.\n\nDescription: {text}"
)

# Our rewriting prompt (RDA): m paraphrases of one sub-sentence.
T_RWT = (
    "Rewrite the following sentence about a pedestrian in {m} different ways. Keep exactly the "
    "same meaning and the same attributes, but use different wording. Write one rewrite per "
    "line, without numbering and without any explanation.\n\nSentence: {text}"
)


def loc_prompt(caption: str) -> str:
    """T_LOC filled with ``caption``."""
    return T_LOC.format(caption=caption)


def vqa_prompt() -> str:
    """T_VQA (it has no placeholder)."""
    return T_VQA


def aggr_prompt(caption: str, subtexts: list[str]) -> str:
    """T_AGGR with a Python list literal: the original caption first, then the sub-texts
    (``repr`` of a list, exactly how the release formats it)."""
    return T_AGGR.format(subtexts=repr([caption, *subtexts]))


def dec_prompt(text: str) -> str:
    """T_DEC filled with the description ``text``."""
    return T_DEC.format(text=text)


def rwt_prompt(sentence: str, m: int) -> str:
    """T_RWT asking for ``m`` rewrites of ``sentence``."""
    if m < 1:
        raise ValueError(f"m (number of rewrites) must be >= 1, got {m}")
    return T_RWT.format(text=sentence, m=m)
