"""extract_choice on messy model outputs: each case names the expected letter (or None) and the rule that fires."""

import pytest

from medee_jax.evaluation import extract_choice, extract_choice_with_rule

FOUR = ["Lateral collateral ligament repair", "Capsular plication", "Radial head replacement", "Radial head ORIF"]
FIVE = FOUR + ["Medial collateral ligament reconstruction"]
YES_NO = ["Yes", "No"]
SIZES = ["Lung", "Lung cancer", "Heart", "Liver"]

CASES = [
    # (text, options, expected letter, expected rule)
    ("B", FOUR, "B", "last_line"),
    ("(c)", FOUR, "C", "last_line"),
    ("d.", FOUR, "D", "last_line"),
    ("The answer is C", FOUR, "C", "answer_is"),
    ("the answer is c.", FOUR, "C", "answer_is"),
    ("Answer: B", FOUR, "B", "answer_is"),
    ("**Answer: D**", FOUR, "D", "answer_is"),
    ("The correct answer is **(A)**.", FOUR, "A", "answer_is"),
    ("Final answer: option C", FOUR, "C", "answer_is"),
    ("The answer is B because the capsule is lax.", FOUR, "B", "answer_is"),
    ("The answer is A large joint effusion.", FOUR, None, None),  # article, not option A
    ("the answer is a fracture of the radial head", FOUR, None, None),
    ("The answer is E", FOUR, None, None),  # beyond four options
    ("The answer is E", FIVE, "E", "answer_is"),
    ("\\boxed{C}", FOUR, "C", "boxed"),
    ("Reasoning... $\\boxed{\\text{B}}$", FOUR, "B", "boxed"),
    ("First \\boxed{A}, then on reflection \\boxed{D}", FOUR, "D", "boxed"),
    ("\\boxed{\\textbf{C}}", FOUR, "C", "boxed"),
    ("\\boxed{Capsular plication}", FOUR, "B", "boxed"),
    ("\\boxed{F}", FOUR, None, None),
    ("<answer>C</answer>", FOUR, "C", "answer_tag"),
    ("<answer> The answer is D. </answer>", FOUR, "D", "answer_tag"),
    ("<answer>A</answer> but the answer is B", FOUR, "A", "answer_tag"),
    ("<think>The answer is A.</think>\nThe answer is C.", FOUR, "C", "answer_is"),
    ("<think>\\boxed{A}</think>\nC", FOUR, "C", "last_line"),
    ("<think>I am sure the answer is A.</think>", FOUR, None, None),  # reasoning is not the answer
    ("<think>Let me think about option B... still thinking", FOUR, None, None),  # cut off inside reasoning
    ("Model continued.</think>The answer is D", FOUR, "D", "answer_is"),  # prompt opened <think>
    ("I first thought A, but the capsule is intact, so the answer is C.", FOUR, "C", "answer_is"),
    ("I first thought A, but I am not sure.", FOUR, None, None),
    ("The answer is C.\nAnswer: see the discussion above.", FOUR, "C", "answer_is"),
    ("Capsular plication", FOUR, "B", "option_text"),
    ("The best option here is radial head ORIF given the fragment size.", FOUR, "D", "option_text"),
    ("Either capsular plication or radial head ORIF could work.", FOUR, None, None),  # two options named
    ("The mass is a lung cancer.", SIZES, "B", "option_text"),  # 'lung' inside 'lung cancer' does not count
    ("The lung and the heart are normal.", SIZES, None, None),
    ("No, the lung is not healthy.", YES_NO, "B", "option_text"),
    ("yes", YES_NO, "A", "option_text"),
    ("Answer: (B) Capsular plication", FOUR, "B", "answer_is"),
    ("Looking at the film\nB. Capsular plication", FOUR, "B", "last_line"),
    ("Looking at the film\nB. Radial head ORIF", FOUR, None, None),  # letter and text disagree
    ("Therefore, among A through E, the answer is E.", FIVE, "E", "answer_is"),
    ("I cannot determine this from the image.", FOUR, None, None),
    ("", FOUR, None, None),
    ("A", ["Only one"] + ["x"], "A", "last_line"),
    ("The answer is `C`", FOUR, "C", "answer_is"),
    ("The answer is J", [f"opt {i}" for i in range(10)], "J", "answer_is"),
    ("The answer is K", [f"opt {i}" for i in range(10)], None, None),
    ("So, the answer would be option b.", FOUR, "B", "answer_is"),
    ("Answer:\n\nD", FOUR, "D", "answer_is"),
]


@pytest.mark.parametrize("text, options, letter, rule", CASES)
def test_extract_choice(text, options, letter, rule):
    assert extract_choice_with_rule(text, options) == (letter, rule)
    assert extract_choice(text, options) == letter


def test_at_least_forty_cases():
    assert len(CASES) >= 40
    assert sum(letter is None for _, _, letter, _ in CASES) >= 10
