"""AUTOMATIC1111's prompt syntax in pure Python: weights, BREAK, prompt editing, LoRA tags.

Each public function mirrors one function of stable-diffusion-webui (its algorithm, written anew):

- ``parse_prompt_attention``  modules/prompt_parser.py ``parse_prompt_attention``:
  ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)``, escapes, ``BREAK``.
- ``prompt_schedules``        modules/prompt_parser.py ``get_learned_conditioning_prompt_schedules``:
  ``[from:to:when]``, ``[to:when]``, ``[from::when]``, ``[a|b]`` (A1111 parses these with a lark
  grammar; here a one-pass bracket matcher accepts the same language).
- ``extract_loras``           modules/extra_networks.py ``parse_prompt`` and the Lora extension's
  ``ExtraNetworkLora.activate``: ``<lora:NAME:WEIGHT>``.

A pipeline applies them in A1111's order: ``extract_loras`` on the whole prompt, then
``prompt_schedules``, then ``parse_prompt_attention`` on each scheduled text.
"""

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

SYNTAXES = ("a1111", "none")
EMPHASES = ("Original", "No norm", "None")

# ---------------------------------------------------------------------------------------------
# Attention weights: "a (b:1.2) [c]" -> [("a ", 1.0), ("b", 1.2), (" ", 1.0), ("c", 1/1.1)]

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0

# One token of the attention syntax. The alternatives are tried in A1111's order: an escaped
# bracket or backslash before a lone backslash (which escapes nothing and is dropped), and a
# weighted close ":1.2)" before a lone ":".
_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]            # \( \) \[ \] \\ : the character itself
    | \\                      # any other backslash: dropped
    | [(\[]                   # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)  # ":w)" closing a round bracket with an explicit weight
    | [)\]]                   # a closing bracket
    | [^\\()\[\]:]+           # text
    | :                       # a colon that closes nothing: text
    """,
    re.X,
)
# BREAK is a keyword only as a whole, upper-case word; the whitespace around it goes with it.
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """The text's pieces and their weights, as A1111's ``parse_prompt_attention``.

    ``(x)`` multiplies x's weight by 1.1, ``[x]`` divides it by 1.1, ``(x:w)`` multiplies it by w;
    nested brackets multiply. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the characters
    themselves; a backslash before anything else is dropped. A closing bracket with no open one
    of its kind is text; a bracket still open at the end applies to everything after it. Each
    ``BREAK`` outside brackets is the piece ``("BREAK", -1.0)`` (inside brackets its weight is
    multiplied too, and the encoder then reads it as the word, as A1111's does). Neighbouring
    pieces of equal weight are merged; an empty text gives ``[("", 1.0)]``.

    Weights are multiplied in A1111's order (innermost bracket first), so they are bit-identical
    to A1111's, which the merging of equal weights depends on. No recursion: the time is the
    text's length plus, for each piece, the number of brackets around it (A1111's own cost), so a
    word inside 1,000 brackets costs 1,000 multiplications.

    Raises ValueError for a weight that is no finite number, such as ``(x:1.2.3)`` (A1111 crashes).
    """
    pieces: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    round_opens: list[int] = []  # index of the first piece inside each open "(" / "["
    square_opens: list[int] = []
    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token[0] == "\\":
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_opens.append(len(pieces))
        elif token == "[":
            square_opens.append(len(pieces))
        elif weight is not None and round_opens:
            _multiply_from(pieces, round_opens.pop(), _explicit_weight(weight, text))
        elif token == ")" and round_opens:
            _multiply_from(pieces, round_opens.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_opens:
            _multiply_from(pieces, square_opens.pop(), SQUARE_MULTIPLIER)
        else:
            _append_text(pieces, token)
    # Brackets left open apply to the end: all round ones (outermost first), then all square ones.
    for start in round_opens:
        _multiply_from(pieces, start, ROUND_MULTIPLIER)
    for start in square_opens:
        _multiply_from(pieces, start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(pieces) or [("", 1.0)]


def _multiply_from(pieces: list[list], start: int, multiplier: float) -> None:
    """Multiply the weight of every piece from ``start`` on (a bracket closing around them)."""
    for index in range(start, len(pieces)):
        pieces[index][1] *= multiplier


def _explicit_weight(weight: str, text: str) -> float:
    """The w of "(x:w)" as a float; A1111's pattern also lets through "1.2.3" and ".", refused here."""
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"prompt weight {weight!r} is not a number in {_excerpt(text)}; write it like (word:1.2)")
    return value


def _append_text(pieces: list[list], text: str) -> None:
    """Append a run of text, each BREAK in it becoming its own piece."""
    for index, part in enumerate(_BREAK.split(text)):
        if index:
            pieces.append(["BREAK", BREAK_WEIGHT])
        pieces.append([part, 1.0])


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float]]:
    """Join each run of neighbouring pieces whose weights are equal (A1111 compares with ==)."""
    runs: list[tuple[list[str], float]] = []
    for text, weight in pieces:
        if runs and runs[-1][1] == weight:
            runs[-1][0].append(text)
        else:
            runs.append(([text], weight))
    return [("".join(texts), weight) for texts, weight in runs]


def _excerpt(text: str, limit: int = 80) -> str:
    """The text for an error message, shortened so that the message stays one readable line."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
