"""Reading the chosen option letter out of a model's free-text answer, by ordered rules, never by guessing.

`extract_choice(text, options)` returns "A", "B", ... or None; `extract_choice_with_rule` also returns the name of
the rule that fired. `options` are the item's option texts in letter order; only their letters are answers.

The answer region: the text after the last `</think>` (reasoning inside `<think>...</think>` is not the answer);
an output with `<think>` but no `</think>` (cut off while reasoning) has no answer. Markdown emphasis and code
marks (`*`, `` ` ``, `__`) are removed. Then, in order, the first rule that yields a letter:

1. `answer_tag`   the last `<answer>...</answer>`: its content is a letter (or an option's text), else the rules
                  below are applied to the content alone;
2. `boxed`        the last `\\boxed{...}` (nested braces, `\\text{}`/`\\textbf{}`/`\\mathrm{}` unwrapped);
3. `answer_is`    the last "answer is" / "answer:" / "answer would be" (also "final/correct answer", "Answer:" at
                  a line start) followed by a letter, "(B)", "option B", or an option's exact text;
4. `last_line`    the last non-empty line is a letter alone ("B", "(B)", "B.", "Option B") or a letter followed
                  by that option's own text ("B. Capsular plication"); a letter followed by another option's
                  text contradicts itself and ends the search with no answer;
5. `option_text`  exactly one option's text occurs in the answer region (occurrences inside a longer matching
                  option's text do not count).

A letter counts only inside the item's range (no "E" for four options). A letter followed by more words counts
only when those words are the option's own text or a connective ("because", "since", "-", "(", ...) — so the
article in "the answer is a fracture" or "The answer is A large mass" is not read as option A.
"""

from __future__ import annotations

import re

from .items import LETTERS

RULES = ("answer_tag", "boxed", "answer_is", "last_line", "option_text")

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_IS_RE = re.compile(
    r"(?:\b(?:final|correct|best|right)\s+)?\banswer\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?\s*(?:[:=]|\bis\b)?"
    r"\s*:?\s*(?:\b(?:option|choice)\s+)?",
    re.IGNORECASE,
)
_LETTER_RE = re.compile(r"^[(\[{]?\s*([A-Za-z])\s*[)\]}]?(?![A-Za-z0-9'])")
_CONNECTIVES = ("because", "since", "as", "which", "given", "due", "-", "–", "—", "(", "is", "was", "as")
_TEX_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")


def answer_region(text: str) -> str:
    """The part of `text` that may hold the answer: after the last `</think>`; "" when reasoning never closed."""
    if _THINK_CLOSE in text:
        return text.rsplit(_THINK_CLOSE, 1)[1]
    if _THINK_OPEN in text:
        return ""
    return text


def _clean(text: str) -> str:
    return text.replace("**", "").replace("__", "").replace("*", "").replace("`", "")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", _clean(text)).strip().strip(".;:,!").strip().lower()


def _option_by_text(fragment: str, options: list[str]) -> str | None:
    """The letter whose option text equals `fragment` (case/space/end-punctuation insensitive), else None."""
    target = _norm(fragment)
    hits = [i for i, o in enumerate(options) if target and _norm(o) == target]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def _letter_at(fragment: str, options: list[str], *, strict_rest: bool) -> str | None:
    """A letter at the start of `fragment` that is an answer (see the module docstring), else None.

    strict_rest: the rest of the fragment must be empty, punctuation, or the option's own text (a whole line).
    """
    fragment = fragment.lstrip()
    match = _LETTER_RE.match(fragment)
    if match is None:
        return None
    letter = match.group(1)
    index = LETTERS.find(letter.upper())
    if index < 0 or index >= len(options):
        return None
    rest = fragment[match.end():]
    line_rest = rest.split("\n", 1)[0]
    tail = line_rest.strip()
    if not tail or re.fullmatch(r"[.,;:!?)\]}]*", tail):
        return letter.upper()
    # "B. Capsular plication", "B: text", "B) text", "B - text": the option's own text after the letter
    text_after = re.sub(r"^[.,;:)\]}\s\-–—]+", "", tail)
    option = _norm(options[index])
    if option and _norm(text_after).startswith(option):
        return letter.upper()
    if strict_rest:
        return None
    if tail[0] in ".,;:!?)]}":  # "A. The patient ..." / "C, because": a delimiter closes the letter
        return letter.upper()
    first_word = tail.split()[0].lower()
    if letter.isupper() and first_word in _CONNECTIVES:
        return letter.upper()
    return None


def _boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` in order (balanced braces)."""
    out, start = [], 0
    while True:
        i = text.find("\\boxed{", start)
        if i < 0:
            return out
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            out.append(text[i + len("\\boxed{"): j - 1])
        start = j


def _parse_box(content: str, options: list[str]) -> str | None:
    previous = None
    while previous != content:
        previous, content = content, _TEX_WRAPPERS.sub(r"\1", content)
    content = content.strip().strip("$").strip()
    return _letter_at(content, options, strict_rest=True) or _option_by_text(content, options)


def _by_answer_phrase(region: str, options: list[str]) -> str | None:
    for match in reversed(list(_ANSWER_IS_RE.finditer(region))):
        fragment = region[match.end():]
        letter = _letter_at(fragment, options, strict_rest=False)
        if letter is None:
            letter = _option_by_text(re.split(r"[\n]|(?<=\.)\s", fragment.strip(), maxsplit=1)[0], options)
        if letter is not None:
            return letter
    return None


def _last_line(region: str) -> str:
    lines = [line.strip() for line in region.strip().splitlines() if line.strip()]
    return re.sub(r"^(?:option|choice)\s+", "", lines[-1], flags=re.IGNORECASE) if lines else ""


def _contradictory_last_line(region: str, options: list[str]) -> bool:
    """The last line is "X. <the text of another option>": the output contradicts itself, so no answer."""
    match = re.match(r"^[(\[]?([A-Za-z])[)\]]?[.:)]\s+(.+)$", _last_line(region))
    if match is None:
        return False
    named = _option_by_text(match.group(2), options)
    return named is not None and named != match.group(1).upper()


def _by_option_text(region: str, options: list[str]) -> str | None:
    low = re.sub(r"\s+", " ", region.lower())
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, option in enumerate(options):
        needle = re.sub(r"\s+", " ", _clean(option).strip().lower())
        if not needle:
            continue
        pattern = (r"(?<![a-z0-9])" if needle[0].isalnum() else "") + re.escape(needle) + \
            (r"(?![a-z0-9])" if needle[-1].isalnum() else "")
        spans[i] = [m.span() for m in re.finditer(pattern, low)]
    found = []
    for i, own in spans.items():
        longer = [s for j, other in spans.items() if j != i and len(options[j]) > len(options[i]) for s in other]
        if any(not any(a <= s0 and e0 <= b for a, b in longer) for s0, e0 in own):
            found.append(i)
    return LETTERS[found[0]] if len(found) == 1 else None


def _apply_rules(region: str, options: list[str], rules: tuple[str, ...]) -> tuple[str | None, str | None]:
    for rule in rules:
        if rule == "answer_tag":
            tags = _ANSWER_TAG_RE.findall(region)
            if tags:
                content = tags[-1]
                letter = _letter_at(content.strip(), options, strict_rest=True) or _option_by_text(content, options)
                if letter is None:
                    letter, _ = _apply_rules(content, options, RULES[1:])
                if letter is not None:
                    return letter, rule
        elif rule == "boxed":
            boxes = _boxed_contents(region)
            if boxes and (letter := _parse_box(boxes[-1], options)) is not None:
                return letter, rule
        elif rule == "answer_is":
            if (letter := _by_answer_phrase(region, options)) is not None:
                return letter, rule
        elif rule == "last_line":
            if _contradictory_last_line(region, options):
                return None, None
            if (letter := _letter_at(_last_line(region), options, strict_rest=True)) is not None:
                return letter, rule
        elif rule == "option_text":
            if (letter := _by_option_text(region, options)) is not None:
                return letter, rule
    return None, None


def extract_choice_with_rule(text: str, options) -> tuple[str | None, str | None]:
    """(letter, rule name) for the first rule that finds an answer in `text`, else (None, None)."""
    options = [str(o) for o in options]
    if not isinstance(text, str) or not options:
        return None, None
    region = _clean(answer_region(text))
    return _apply_rules(region, options, RULES)


def extract_choice(text: str, options) -> str | None:
    """The option letter ("A", "B", ...) `text` answers with, or None; never a guess (see the module docstring)."""
    return extract_choice_with_rule(text, options)[0]
