"""Prompts for multiple-choice items: chat messages (`{"role", "content"}`, `<image>` placeholders in the text).

Styles:
- "direct": the question, the options as "A. text" lines, then "Answer with the option's letter from the given
  choices directly." (MMMU's direct-answer instruction).
- "cot": the same with a chain-of-thought instruction ending in `\\boxed{X}` (default below; the config's
  `prompt.instruction` replaces it, e.g. with the demo's "Reason step by step inside <think> </think>, then give
  the final answer as "The answer is X"." the demo models were trained on).
- "medxpertqa_cot": MedXpertQA's official two-turn zero-shot chain of thought: system "You are a helpful medical
  assistant.", user "Q: {question}\\nAnswer Choices: (A) .. (B) ..\\nA: Let's think step by step." with the images
  after the text; the model's reply is then followed by the user turn "Therefore, among A through E, the answer
  is" (E = the item's last letter) and the model's second reply holds the answer.

Images go before the question when the item's text has no `<image>` placeholders (Qwen-VL's usual order, and the
order the demo data uses), except in "medxpertqa_cot", which follows the benchmark's text-then-images order.
"""

from __future__ import annotations

from .items import IMAGE_PLACEHOLDER, LETTERS, MCItem

STYLES = ("direct", "cot", "medxpertqa_cot")
DIRECT_INSTRUCTION = "Answer with the option's letter from the given choices directly."
COT_INSTRUCTION = ("Think step by step, then give the letter of the correct option as \\boxed{X}, "
                   "where X is the letter.")
MEDXPERTQA_SYSTEM = "You are a helpful medical assistant."
MEDXPERTQA_STEP = "Q: {question}\nA: Let's think step by step."
MEDXPERTQA_TRIGGER = "Therefore, among A through {last}, the answer is"


def medxpertqa_question(item: MCItem) -> str:
    """The item's question with MedXpertQA's "Answer Choices: (A) x (B) y" line (its original question text)."""
    choices = " ".join(f"({letter}) {text}" for letter, text in zip(LETTERS, item.options))
    return f"{item.question}\nAnswer Choices: {choices}"


def _with_images(item: MCItem, text: str, *, images_first: bool) -> str:
    if IMAGE_PLACEHOLDER in text or not item.images:
        return text
    marks = IMAGE_PLACEHOLDER * len(item.images)
    return marks + text if images_first else text + marks


def first_turn(item: MCItem, style: str, *, instruction: str = "", system: str = "") -> list[dict]:
    """The messages the model answers first (for "medxpertqa_cot": the reasoning turn)."""
    if style == "medxpertqa_cot":
        user = _with_images(item, MEDXPERTQA_STEP.format(question=medxpertqa_question(item)), images_first=False)
        return [{"role": "system", "content": system or MEDXPERTQA_SYSTEM}, {"role": "user", "content": user}]
    if style not in STYLES:
        raise ValueError(f"prompt style must be one of {STYLES}, got {style!r}")
    default = DIRECT_INSTRUCTION if style == "direct" else COT_INSTRUCTION
    lines = [item.question] + [f"{letter}. {text}" for letter, text in zip(LETTERS, item.options)]
    lines.append(instruction or default)
    user = _with_images(item, "\n".join(lines), images_first=True)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def needs_second_turn(style: str) -> bool:
    """Whether the answer comes from a second turn (MedXpertQA's two-turn protocol)."""
    return style == "medxpertqa_cot"


def second_turn(item: MCItem, first_messages: list[dict], first_reply: str) -> list[dict]:
    """The conversation after the reasoning reply, ending with the answer trigger."""
    trigger = MEDXPERTQA_TRIGGER.format(last=item.letters[-1])
    return first_messages + [{"role": "assistant", "content": first_reply.strip()}, {"role": "user", "content": trigger}]
