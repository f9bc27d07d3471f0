"""Answer extraction: which option a VLM's free-text output chose, or ``None``.

The paper measures "exact match with the multiple choice options" (§3.3). ``extract_answer``
reads a letter the output asserts as its answer, else the one option whose text the output
names, else gives up: it never guesses and never asks a judge model. Compatible in spirit with
VLMEvalKit's ``can_infer_option`` / ``can_infer_text`` (vlmeval/utils/matching_util.py), but
stricter about English words that look like letters ("A photo of…", "Based on…").

Order of evidence:
1. *Asserted letters*: a letter after an answer cue ("Answer: B", "The answer is (b)",
   "Option B", "I choose B", ``\\boxed{B}``, ``<answer>B</answer>``), a letter before "is correct",
   a whole output that is one letter ("B", "b.", "(B)"), and option markers at the start of a
   line ("B. tulip", "(c) daisy"). All of them together must name one letter; a letter whose
   following text is another option's text ("B. daisy" when daisy is C) is a contradiction.
2. *Standalone letters*: with option texts masked out, the capital option letters that stand
   alone as tokens ("ASSISTANT: D", "Clearly, C."); "A"/"I" before a word are the article and
   the pronoun, a letter right after "not" is skipped. Exactly one distinct letter is needed.
3. *Option text*: exactly one option's text occurs in the output (case-insensitive, on word
   boundaries); an option whose every occurrence lies inside a longer option's occurrence
   ("rose" inside "desert-rose") does not count.
Anything else is ``None`` (counted as wrong, and reported as the unparsable rate).
"""

from __future__ import annotations

import re

from fgvlm.mcq import LETTERS

CONFLICT = "!"  # marker: an asserted letter contradicted by the option text that follows it
WORD_LETTERS = frozenset("ai")  # single letters that are also English words (article, pronoun)
_EDGE = r"\w'’\-"  # characters that glue a letter to a word: "Based", "B's", "D-day"
_ABBREV = r"(?!\.\w)"  # a letter before ".x" abbreviates: "e.g.", "a.m.", "U.S."
_MASK = "§"  # stands in for a masked option text; counts as a word after "A"/"I"
# words that never follow the article "a": "A or B", "A is correct", "A because …"
_NOT_AFTER_ARTICLE = r"(?:or|and|nor|is|vs|versus|because|since|seems|looks|appears)\b"

# answer cues: the letter token must follow right after the match
_CUES = [
    re.compile(
        r"\b(?:(?:final|correct|right|best|most\s+likely|only)\s+)?(?:answer|option|choice)\b"
        r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be|seems\s+to\s+be))?"
        r"(?:\s+(?:probably|likely|clearly|definitely))?"
        r"\s*(?:[:=]|-(?=\s))?\s*"
        r"(?:(?:the\s+)?(?:option|choice|letter)\s*:?\s*)?",
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(?:i\s+(?:would\s+|will\s+)?|i'd\s+|i'll\s+|let's\s+|we\s+)"
        r"(?:choose|chose|select|pick|go\s+with)\s+(?:(?:the\s+)?(?:option|choice|letter)\s+)?",
        re.IGNORECASE,
    ),
    re.compile(r"\\boxed\{\s*"),
    re.compile(r"<answer>\s*", re.IGNORECASE),
]
# a letter token: wrapped "(b)" / "[b]" or bare, never glued to a word
_TOKEN = re.compile(rf"(?:[\(\[]\s*([A-Za-z])\s*[\)\]]|([A-Za-z])(?![{_EDGE}]){_ABBREV})")
_LIST_SEP = re.compile(r"\s*(?:,|/|&|\band\b|\bor\b)\s*", re.IGNORECASE)
# "B is correct", "(c) is the right answer"
_IS_CORRECT = re.compile(
    rf"(?<![{_EDGE}])(?:[\(\[]\s*([A-Za-z])\s*[\)\]]|([A-Z]))"
    r"\s+is\s+(?:the\s+)?(?:correct|right|best|answer)\b"
)
# an option marker at the start of a later line: "C. daisy", "(c) daisy", "C) daisy"
_LINE_MARKER = re.compile(
    rf"^[ \t]*(?:[\(\[]\s*([A-Za-z])\s*[\)\]]|([A-Z])[.:)](?![{_EDGE}]))", re.MULTILINE
)
_SAME_LINE_TEXT = r"[ \t]*[.:)\]\-–—]?[ \t]*\w"  # text right after a letter, on its line
_STANDALONE = re.compile(
    rf"(?<![{_EDGE}])(?:[\(\[]\s*([a-z])\s*[\)\]]|([A-Z])(?![{_EDGE}]){_ABBREV})"
)
_NEGATED = re.compile(r"(?:\bnot|n't)\s+(?:(?:option|choice|answer)\s+)?[\(\[]?\s*$", re.I)
_SPECIAL_TOKENS = re.compile(r"<\|[^|>]*\|>|</?s>|<end_of_utterance>|<pad>")
_ARTICLE = re.compile(r"(?:a|an|the)\s+", re.IGNORECASE)


def _normalize(text: str) -> str:
    """Lower-case, underscores and runs of whitespace as one space: how option texts compare."""
    return " ".join(text.replace("_", " ").replace("’", "'").lower().split())


def _clean(output: str) -> str:
    """The output without markdown emphasis, code ticks and chat special tokens."""
    text = _SPECIAL_TOKENS.sub(" ", output)
    return text.replace("*", "").replace("`", "").replace("’", "'").strip()


def _option_at(rest: str, options: list[str]) -> int | None:
    """Index of the longest option whose text starts ``rest`` (after separators, an article)."""
    head = _normalize(rest.split("\n", 1)[0].lstrip(" \t.:)]-–—,"))
    head = _ARTICLE.sub("", head, count=1) if _ARTICLE.match(head) else head
    best, best_len = None, 0
    for i, option in enumerate(options):
        text = _normalize(option)
        if text and head.startswith(text) and len(text) > best_len:
            if re.match(r"\w", head[len(text) : len(text) + 1]) is None:  # ends on a boundary
                best, best_len = i, len(text)
    return best


def _judge(text: str, end: int, letter: str, wrapped: bool, options: list[str], cued: bool):
    """The letter a token ending at ``end`` asserts (upper case), ``CONFLICT``, or ``None``.

    ``None``: not this question's letter, or an English word ("a daisy", "A photo", "I think").
    ``cued``: the token follows an answer cue (mid-sentence), so a capital "A" before a word is
    the letter ("The answer is A because…"); at the start of the output it is the article.
    """
    index = LETTERS.index(letter.upper())
    if index >= len(options):
        return None
    rest = text[end:]
    following = _option_at(rest, options)
    word_follows = re.match(r"\s+\w", rest) and not re.match(rf"\s+{_NOT_AFTER_ARTICLE}", rest)
    if not wrapped and word_follows and letter.lower() in WORD_LETTERS:
        if following == index:
            return letter.upper()  # "A tulip" when tulip is A: article or letter, both say A
        if following is not None or letter.islower() or not cued:
            return None
    if following is not None and following != index and re.match(_SAME_LINE_TEXT, rest):
        return CONFLICT  # "B. daisy" when daisy is option C
    return letter.upper()


def _token_letter(match: re.Match) -> tuple[str, bool]:
    """(letter, wrapped in brackets) of a ``_TOKEN``-shaped match."""
    return (match.group(1), True) if match.group(1) else (match.group(2), False)


def _with_listed(text: str, first: str, end: int, options: list[str]) -> list[str]:
    """``first`` plus the letters listed after it: "B or C", "B, C", "B/C", "B and C"."""
    found = [first]
    while (sep := _LIST_SEP.match(text, end)) and (token := _TOKEN.match(text, sep.end())):
        letter, wrapped = _token_letter(token)
        verdict = _judge(text, token.end(), letter, wrapped, options, True)
        if verdict is None:
            break
        found.append(verdict)
        end = token.end()
    return found


def _cued_letters(text: str, options: list[str]) -> list[str]:
    """Letters asserted after answer cues or before "is correct", lists included."""
    found = []
    for cue in _CUES:
        for match in cue.finditer(text):
            token = _TOKEN.match(text, match.end())
            if token is None:
                continue
            letter, wrapped = _token_letter(token)
            verdict = _judge(text, token.end(), letter, wrapped, options, True)
            if verdict is not None:
                found += _with_listed(text, verdict, token.end(), options)
    for match in _IS_CORRECT.finditer(text):
        letter, wrapped = _token_letter(match)
        verdict = _judge(text, match.end(), letter, wrapped, options, True)
        if verdict is not None:
            found.append(verdict)
    return found


def _opening_letters(text: str, options: list[str]) -> list[str]:
    """A letter that opens the output: "B", "b.", "(b) …", "B. tulip", "B tulip", "A or B"."""
    token = _TOKEN.match(text)
    if token is None:
        return []
    letter, wrapped = _token_letter(token)
    rest = text[token.end() :]
    own = LETTERS.index(letter.upper())
    if wrapped or re.fullmatch(r"[.:)\]]?\s*", rest):  # "(b) …", "B", "b."
        verdict = _judge(text, token.end(), letter, True, options, True)
    elif re.match(r"[.:)\]]\s", rest):  # "B. tulip"; lower case only as "b) …" or "b. <its text>"
        marker = letter.isupper() or rest[0] in ")]" or _option_at(rest, options) == own
        verdict = _judge(text, token.end(), letter, True, options, True) if marker else None
    elif letter.isupper():  # "B tulip", "D - sunflower", "B, …"; "A photo" is the article
        verdict = _judge(text, token.end(), letter, False, options, False)
    elif re.match(r"\s", rest) and _option_at(rest, options) == own:  # "b tulip"
        verdict = _judge(text, token.end(), letter, True, options, True)
    else:
        verdict = None
    return [] if verdict is None else _with_listed(text, verdict, token.end(), options)


def _leading_letters(text: str, options: list[str]) -> list[str]:
    """The opening letter and option markers opening later lines ("C. daisy", "(c) daisy")."""
    found = _opening_letters(text, options)
    for marker in _LINE_MARKER.finditer(text):
        if marker.start() == 0:
            continue  # the first line was judged above
        letter, _ = _token_letter(marker)
        verdict = _judge(text, marker.end(), letter, True, options, True)
        if verdict is not None:
            found.append(verdict)
    return found


def _mask_options(text: str, options: list[str]) -> str:
    """``text`` with every option text (longest first, case-insensitive) replaced by ``_MASK``."""
    for option in sorted({o.strip() for o in options if o.strip()}, key=len, reverse=True):
        pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, option.split())) + r"(?!\w)"
        text = re.sub(pattern, _MASK, text, flags=re.IGNORECASE)
    return text


def _standalone_letters(text: str, options: list[str]) -> list[str]:
    """Option letters standing alone as tokens once the option texts are masked out."""
    masked = _mask_options(text, options)
    found = []
    for match in _STANDALONE.finditer(masked):
        letter = match.group(1) or match.group(2)
        index = LETTERS.index(letter.upper())
        if index >= len(options) or _NEGATED.search(masked[: match.start()]):
            continue
        if match.group(2) and letter.lower() in WORD_LETTERS:
            after = masked[match.end() :]
            if re.match(rf"\s+[\w{_MASK}]", after) and not re.match(
                rf"\s+{_NOT_AFTER_ARTICLE}", after
            ):
                continue  # "A photo", "I think", "A §"
        found.append(letter.upper())
    return found


def _option_text_match(text: str, options: list[str]) -> str | None:
    """The letter of the one option whose text the output names, else ``None``."""
    haystack = _normalize(text)
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, option in enumerate(options):
        needle = _normalize(option)
        if not needle:
            continue
        pattern = r"(?<!\w)" + re.escape(needle) + r"(?!\w)"
        found = [m.span() for m in re.finditer(pattern, haystack)]
        if found:
            spans[i] = found

    def inside_longer(i: int, span: tuple[int, int]) -> bool:
        # a strictly longer occurrence of another option covers this one
        return any(
            j != i and s[0] <= span[0] and span[1] <= s[1] and s[1] - s[0] > span[1] - span[0]
            for j, others in spans.items()
            for s in others
        )

    survivors = [i for i, found in spans.items() if not all(inside_longer(i, s) for s in found)]
    if len(survivors) != 1:
        return None
    return LETTERS[survivors[0]]


def extract_answer(output: str, options: list[str]) -> str | None:
    """The option letter ("A", "B", … one per option) chosen by ``output``, or ``None`` when it cannot be told.

    In: the model's raw text and the question's option texts in letter order.
    Out: an upper-case letter of the options, or ``None`` (unparsable or self-contradictory).
    """
    if not options or len(options) > len(LETTERS):
        raise ValueError(f"extract_answer: need 1 to 26 options, got {len(options)}")
    text = _clean(output)
    if not text:
        return None
    asserted = set(_cued_letters(text, options) + _leading_letters(text, options))
    if asserted:
        return asserted.pop() if len(asserted) == 1 and CONFLICT not in asserted else None
    standalone = set(_standalone_letters(text, options))
    if standalone:
        return standalone.pop() if len(standalone) == 1 else None
    return _option_text_match(text, options)
