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
    text's length plus, for each piece, the number of brackets around it (A1111's own cost). That
    is linear for prompts as people write them (a word inside 1,000 brackets: 1,000
    multiplications); only text at every level of a deep nest, "(a(a(a...", grows as the square
    of the depth, which no order-preserving product can avoid: each piece ends a different chain.

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
    value = _finite_number(weight)
    if value is None:
        raise ValueError(f"prompt weight {weight!r} is not a number in {_excerpt(text)}; write it like (word:1.2)")
    return value


def _finite_number(text: str) -> Optional[float]:
    """``float(text)`` (as A1111 reads its numbers) when that is a finite number, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


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


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation: "a [cat:dog:0.5]" -> [(10, "a cat"), (20, "a dog")] at 20 steps
#
# A1111's lark grammar, read as a bracket language: a group is "(P)", "(P:P)", "[P]" (text, kept
# as written), "[P:P:N]", "[P:N]" (an edit: N a signed number, spaces around it allowed) or
# "[P|P|...]" (an alternation, options may be empty). P is text, "\" + any character but a
# newline, and groups, but no stray bracket, ":" or "|"; outside every group a bracket or ":" that
# forms no group is text. So brackets pair by proper nesting, and a group that is not well formed
# makes every group still open around it text as well. A "|" left outside every alternation, or
# a backslash escaping nothing, leaves the grammar without a parse: A1111 then keeps the prompt
# whole, and so does this.

_SCHEDULE_TOKEN = re.compile(r"\\.|[\[\]():|]|[^\\\[\]():|]+|\\")
# lark's SIGNED_NUMBER (ASCII digits, optional exponent), with the optional whitespace around it.
_EDIT_STEP = re.compile(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")

Item = Union[str, list, "_Edit", "_Alternation"]


@dataclass
class _Edit:
    """[before:after:when]: ``before`` (None for "[after:when]") up to step ``when``, then ``after``."""

    before: Optional[list]
    after: list
    when: int


@dataclass
class _Alternation:
    """[a|b|...]: option (step - 1) % n at each step."""

    options: list


class _OpenGroup:
    """A bracket whose closing bracket has not come yet: its contents, split at ":" and "|"."""

    def __init__(self, opener: str):
        self.opener = opener
        self.segments: list[list] = [[]]
        self.separators: list[str] = []

    def add_separator(self, separator: str) -> None:
        self.separators.append(separator)
        self.segments.append([])


def prompt_schedules(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The prompt's texts over the sampling steps, as A1111's ``get_learned_conditioning_prompt_schedules``.

    Returns ``(end_step, text)`` pairs in step order: ``text`` holds for the steps up to and
    including ``end_step`` (steps count from 1) and the last ``end_step`` is ``steps``. Like A1111,
    every edit's step and, with an alternation, every step is listed, even where the text does not
    change, and a prompt without editing or alternation comes back as ``[(steps, prompt)]``.

    An edit's ``when`` with a "." is a fraction of ``steps`` (``0.5`` -> ``int(0.5 * steps)``), one
    without is a step (``1.0`` is all steps, ``1`` is step 1); steps before 1 are never reached,
    so the edit shows ``after`` from the start. This is A1111's default rule for a txt2img run
    (``hires_steps=None``, the option ``use_old_scheduling`` off). An alternation shows option
    (step - 1) % n at each step. A1111 crashes on a ``when`` that overflows a float (``1e999``);
    here it means "never", like any ``when`` past the last step.

    Where a prompt has two parses (an edit followed by a stray bracket or ":", such as
    "[a:1]]"), A1111's lark parser picks one by the process's random string hash seed; here the
    edit is always read as one.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number of at least 1, not {steps!r}")
    parsed = _parse_schedule_syntax(prompt, steps)
    if parsed is None:
        return [(steps, prompt)]
    items, nodes = parsed
    return [(step, _text_at(items, step)) for step in _change_steps(nodes, steps)]


def _parse_schedule_syntax(prompt: str, steps: int) -> Optional[tuple[list, list]]:
    """The prompt as a tree of text, groups, edits and alternations, and a list of its edits and alternations.

    None when the prompt has no parse. One pass, no recursion: groups wait on a stack until their
    closing bracket comes. The tree holds every character of the prompt but the brackets, colons
    and spaces that edits and alternations take up, so without them it gives the prompt back.
    """
    top: list = []  # what lies outside every group
    groups: list[_OpenGroup] = []
    nodes: list = []  # every edit and alternation, wherever it is in the tree
    for token in _SCHEDULE_TOKEN.findall(prompt):
        if token == "\\":
            return None
        if token in ("(", "["):
            groups.append(_OpenGroup(token))
        elif token in (":", "|") and groups:
            groups[-1].add_separator(token)
        elif token in (")", "]") and groups:
            node = _close(groups[-1], token, steps)
            if node is None:
                # This group, and every group around it, is plain text after all.
                if not _flatten_open_groups(groups, top):
                    return None
                top.append(token)
            else:
                groups.pop()
                _innermost(groups, top).append(node)
                if not isinstance(node, list):
                    nodes.append(node)
        elif token == "|":
            return None
        else:
            _innermost(groups, top).append(token)
    if not _flatten_open_groups(groups, top):
        return None
    return top, nodes


def _innermost(groups: list[_OpenGroup], top: list) -> list:
    """Where the next item goes: the innermost open group's current segment, or the top level."""
    return groups[-1].segments[-1] if groups else top


def _close(group: _OpenGroup, closer: str, steps: int) -> Optional[Item]:
    """The group that ``closer`` completes, or None when the group is not well formed."""
    separators, segments = group.separators, group.segments
    if group.opener == "(" and closer == ")" and separators in ([], [":"]):
        return ["(", *_interleave(segments, separators), ")"]
    if group.opener != "[" or closer != "]":
        return None
    if not separators:
        return ["[", segments[0], "]"]
    if set(separators) == {"|"}:
        return _Alternation(segments)
    if separators in ([":"], [":", ":"]) and all(isinstance(item, str) for item in segments[-1]):
        number = _EDIT_STEP.fullmatch("".join(segments[-1]))
        if number:
            before = segments[0] if len(segments) == 3 else None
            return _Edit(before, segments[-2], _edit_step(number.group(1), steps))
    return None


def _interleave(segments: list[list], separators: list[str]) -> list:
    """Segments with their separators back between them, as written."""
    items = [segments[0]]
    for separator, segment in zip(separators, segments[1:]):
        items += [separator, segment]
    return items


def _flatten_open_groups(groups: list[_OpenGroup], top: list) -> bool:
    """Make every open group plain text at the top level; False if a "|" is left outside any alternation."""
    for group in groups:
        if "|" in group.separators:
            return False
        top.append(group.opener)
        top += _interleave(group.segments, group.separators)
    groups.clear()
    return True


def _edit_step(number: str, steps: int) -> int:
    """The last step of an edit's first part: A1111's rule, clamped to 0..steps before int()."""
    value = float(number)
    if "." in number:
        value *= steps
    return int(max(0.0, min(float(steps), value)))


def _change_steps(nodes: list, steps: int) -> list[int]:
    """The end steps of a schedule, as A1111 lists them: every edit's step from 1 on, with an
    alternation every step, and the last step."""
    if any(isinstance(node, _Alternation) for node in nodes):
        return list(range(1, steps + 1))
    return sorted({node.when for node in nodes if node.when >= 1} | {steps})


def _text_at(items: list, step: int) -> str:
    """The parsed prompt's text at one step: a walk with an explicit stack, no recursion."""
    out: list[str] = []
    stack = [iter(items)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, str):
                out.append(item)
            else:
                stack.append(iter(_chosen(item, step)))
                break
        else:
            stack.pop()
    return "".join(out)


def _chosen(node: Item, step: int) -> list:
    """What a node shows at ``step``: a group itself, an edit's part, an alternation's option."""
    if isinstance(node, _Edit):
        return (node.before or []) if step <= node.when else node.after
    if isinstance(node, _Alternation):
        return node.options[(step - 1) % len(node.options)]
    return node


# ---------------------------------------------------------------------------------------------
# Extra-network tags: "a cat <lora:film:0.7>" -> ("a cat ", [("film", 0.7)])

# A1111's tag: "<" kind ":" arguments ">", the arguments separated by ":".
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
# The kinds A1111's Lora extension answers to ("lyco" is its alias for LyCORIS-era prompts).
LORA_KINDS = ("lora", "lyco")


def extract_loras(text: str) -> tuple[str, list[tuple[str, float]]]:
    """The text without its extra-network tags, and the (name, weight) of each LoRA tag in order.

    Mirrors A1111's ``extra_networks.parse_prompt``, which removes every ``<kind:args>`` tag
    (``<hypernet:...>`` and unknown kinds too, which A1111 then skips: only LoRA tags are
    returned here), and its Lora extension's reading of the arguments: ``<lora:NAME>`` has
    weight 1.0, ``<lora:NAME:0.7>`` 0.7. A1111 also takes a separate UNet weight and a rank,
    ``<lora:NAME:TE:UNET:DYN>`` or named ``te=``, ``unet=``, ``dyn=``; the weight returned is its
    text-encoder weight (the first number, or ``te=``), which is also its UNet weight unless a
    second one is given. A UNet weight that differs from it, or a rank, changes the result in a
    way the weight alone cannot carry, so it is refused rather than ignored.

    Raises ValueError naming the tag for a tag without a name, with a weight that is no finite
    number (A1111 crashes on those), or with a separate UNet weight or rank.
    """
    loras: list[tuple[str, float]] = []

    def remove(match: re.Match) -> str:
        if match.group(1) in LORA_KINDS:
            loras.append(_lora_tag(match.group(0), match.group(2).split(":")))
        return ""

    return _EXTRA_NETWORK_TAG.sub(remove, text), loras


def _lora_tag(tag: str, arguments: list[str]) -> tuple[str, float]:
    """(name, weight) of one LoRA tag, its arguments read as A1111's ``ExtraNetworkParams`` does."""
    positional, named = [], {}
    for argument in arguments:
        parts = argument.split("=", 2)  # "a=b=c" has three parts: positional, as in A1111
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(argument)
    if not positional or not positional[0]:
        raise ValueError(f"LoRA tag {tag!r} has no name; write it like <lora:NAME:0.8>")
    weight = _tag_number(tag, named.get("te", positional[1] if len(positional) > 1 else "1.0"))
    unet = named.get("unet", positional[2] if len(positional) > 2 else None)
    if unet is not None and _tag_number(tag, unet) != weight:
        raise ValueError(f"LoRA tag {tag!r}: a UNet weight apart from the text encoder's is not supported; give one")
    if len(positional) > 3 or "dyn" in named:
        raise ValueError(f"LoRA tag {tag!r}: a rank (dyn) is not supported; give only the name and weight")
    return positional[0], weight


def _tag_number(tag: str, value: str) -> float:
    """A tag's number as A1111's float() reads it, refusing what is no finite number."""
    number = _finite_number(value)
    if number is None:
        raise ValueError(f"LoRA tag {tag!r}: {value!r} is not a number; write the weight like <lora:NAME:0.8>")
    return number
