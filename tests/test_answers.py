"""Answer extraction on real-world VLM output shapes: letters, option texts, and refusals."""

from __future__ import annotations

import pytest

from fgvlm.evaluate.answers import extract_answer

FLOWERS = ["tulip", "rose", "daisy", "sunflower", "orchid"]  # A-E
ROSES = ["rose", "desert-rose", "tulip", "lily", "iris"]  # "rose" is inside "desert-rose"
VITAMINS = ["Vitamin A", "Vitamin C", "Iron", "Zinc"]  # option texts holding capital letters
COUNTS = ["1", "2", "3", "4"]  # MMBench-style counting options
YES_NO = ["Yes", "No"]
NINE = [f"class {i}" for i in range(9)]  # A-I: "I" is an option letter and a pronoun

# (output, options, expected letter or None)
CASES = [
    # bare and punctuated letters
    ("B", FLOWERS, "B"),
    ("B.", FLOWERS, "B"),
    ("(B)", FLOWERS, "B"),
    ("B)", FLOWERS, "B"),
    ("B:", FLOWERS, "B"),
    ("[D]", FLOWERS, "D"),
    ("  C\n", FLOWERS, "C"),
    ("b", FLOWERS, "B"),  # a whole output that is one letter is unambiguous in any case
    ("a.", FLOWERS, "A"),
    ("E", FLOWERS, "E"),
    ("**B**", FLOWERS, "B"),
    ("`C`", FLOWERS, "C"),
    ("D</s>", FLOWERS, "D"),
    ("C<|im_end|>", FLOWERS, "C"),
    # letter then its option text
    ("B. rose", FLOWERS, "B"),
    ("(c) daisy", FLOWERS, "C"),
    ("b) rose", FLOWERS, "B"),
    ("D - sunflower", FLOWERS, "D"),
    ("A. tulip", FLOWERS, "A"),
    ("B. desert-rose", ROSES, "B"),
    # explicit answer phrases
    ("Answer: B", FLOWERS, "B"),
    ("Answer:B", FLOWERS, "B"),
    ("answer: b", FLOWERS, "B"),
    ("**Answer:** C", FLOWERS, "C"),
    ("The answer is B", FLOWERS, "B"),
    ("The answer is B.", FLOWERS, "B"),
    ("The answer is (B).", FLOWERS, "B"),
    ("the correct option is (b)", FLOWERS, "B"),
    ("Option B", FLOWERS, "B"),
    ("Option D: sunflower", FLOWERS, "D"),
    ("The correct answer is option E: orchid", FLOWERS, "E"),
    ("Answer: (B) rose", FLOWERS, "B"),
    ("The answer is B. rose", FLOWERS, "B"),
    ("The answer is b because it has thorns.", FLOWERS, "B"),
    ("The answer is A because the petals are cupped.", FLOWERS, "A"),
    ("Answer: A", FLOWERS, "A"),
    ("I think the answer is D.", FLOWERS, "D"),
    ("The image shows a sunflower, so the answer is D.", FLOWERS, "D"),
    ("I choose C.", FLOWERS, "C"),
    ("I would go with option E.", FLOWERS, "E"),
    ("C is the correct answer.", FLOWERS, "C"),
    ("(e) is correct", FLOWERS, "E"),
    ("My final answer is \\boxed{D}", FLOWERS, "D"),
    ("<answer>E</answer>", FLOWERS, "E"),
    ("The answer is B, not C.", FLOWERS, "B"),
    # letters elsewhere in the output (standalone tokens)
    ("ASSISTANT: D", FLOWERS, "D"),
    ("Clearly, C.", FLOWERS, "C"),
    ("It is not A. It is D.", FLOWERS, "D"),
    ("The flower in the photo is most likely a rose (B).", FLOWERS, "B"),
    ("B\nA tulip has cupped petals, but this one has thorns.", FLOWERS, "B"),
    ("A, because the petals are cupped.", FLOWERS, "A"),
    ("A is correct", FLOWERS, "A"),
    # words that start with or are option letters: never read as letters
    ("A photo of a daisy.", FLOWERS, "C"),
    ("a photo of a daisy", FLOWERS, "C"),
    ("A rose.", FLOWERS, "B"),  # the article, then option B's text
    ("A tulip.", FLOWERS, "A"),  # article or letter: both say A
    ("Based on the petals, this is a daisy.", FLOWERS, "C"),
    ("Based on the image, I cannot tell.", FLOWERS, None),
    ("Clearly, it is an orchid.", FLOWERS, "E"),
    ("Daisy", FLOWERS, "C"),
    ("Echinacea", FLOWERS, None),
    ("The answer is e.g. a daisy", FLOWERS, "C"),  # "e.g." is no letter E
    ("the answer is a daisy", FLOWERS, "C"),
    ("Answer: A daisy", FLOWERS, "C"),
    ("I think it is a sunflower.", NINE, None),  # "I" the pronoun, no option text
    ("I", NINE, "I"),
    ("The answer is I.", NINE, "I"),
    # option text only
    ("It's a rose.", FLOWERS, "B"),
    ("rose", FLOWERS, "B"),
    ("ROSE", FLOWERS, "B"),
    ("This flower is a Sunflower (Helianthus).", FLOWERS, "D"),
    ("desert-rose", ROSES, "B"),
    ("a desert rose", ["rose", "desert rose", "tulip"], "B"),
    ("a rose", ROSES, "A"),
    ("Vitamin C", VITAMINS, "B"),  # the capital C belongs to the option text
    ("There are 3 shapes.", COUNTS, "C"),
    ("There are 13 shapes.", COUNTS, None),  # "3" inside "13" is not a match
    ("Yes", YES_NO, "A"),
    ("yes, there is a red circle", ["No", "Yes"], "B"),
    ("A", YES_NO, "A"),
    # two answers, contradictions, refusals: None, never a guess
    ("Answer: B or C", FLOWERS, None),
    ("Option B, C", FLOWERS, None),
    ("A or B", FLOWERS, None),
    ("Hmm, A or B", FLOWERS, None),
    ("B. rose\nThe answer is D.", FLOWERS, None),
    ("B. daisy", FLOWERS, None),  # letter B but option C's text
    ("A. desert-rose", ROSES, None),
    ("A. tulip\nB. rose\nC. daisy", FLOWERS, None),  # the options echoed
    ("It is either a rose or a daisy.", FLOWERS, None),
    ("It's a rose, not a desert-rose", ROSES, None),
    ("Either (B) or (D).", FLOWERS, None),
    ("I'm not sure.", FLOWERS, None),
    ("", FLOWERS, None),
    ("   ", FLOWERS, None),
    ("F", FLOWERS, None),  # not a letter of these options
    ("Answer: F", FLOWERS, None),
    ("C", YES_NO, None),
]


@pytest.mark.parametrize(("output", "options", "expected"), CASES)
def test_extract_answer_table(output, options, expected):
    assert extract_answer(output, options) == expected


def test_table_is_large():
    assert len(CASES) >= 40


def test_more_than_26_or_no_options_is_an_error():
    with pytest.raises(ValueError, match="options"):
        extract_answer("A", [])
    with pytest.raises(ValueError, match="options"):
        extract_answer("A", [str(i) for i in range(27)])
