"""A1111's prompt syntax (stable_diffusion/prompts.py) against AUTOMATIC1111's documented behaviour.

The cases marked "A1111 doctest" are the doctests of stable-diffusion-webui's
modules/prompt_parser.py, copied as data. The other expectations follow from A1111's algorithm
as its code reads (and were checked by running A1111's functions with its pinned lark 1.1.2);
weights are written as the products A1111 forms, innermost bracket first.
"""

import gc
import math
import time

import pytest

from stable_diffusion.prompts import (
    EMPHASES,
    SYNTAXES,
    extract_loras,
    parse_prompt_attention,
    prompt_schedules,
)

# Each float multiplication adds at most half an ulp (1.1e-16) of relative error, so a product of
# up to 1,000 factors in any order is within ~1e-13 of the exact one; 1e-12 is still far below any
# factor a prompt can write. Where A1111's exact bits matter (merging equal weights), the
# bit-identical test below checks them.
REL = 1e-12


def assert_pieces(got, expected, rel=REL):
    assert [text for text, _ in got] == [text for text, _ in expected]
    for (_, weight), (_, want) in zip(got, expected):
        assert weight == pytest.approx(want, rel=rel, abs=0.0)


# ---------------------------------------------------------------------------------------------
# parse_prompt_attention

ATTENTION_DOCTESTS = [  # A1111 doctest
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text, expected", ATTENTION_DOCTESTS)
def test_attention_matches_a1111_doctests(text, expected):
    assert_pieces(parse_prompt_attention(text), expected)


def test_attention_weights_are_bit_identical_to_a1111s_products():
    # A1111 multiplies innermost first: ((1.0 * 1.3) * 1.1) * 1.1, printed 1.5730000000000004 in
    # its doctest; ((1.0 * 1.1) * 1.1) * 1.3 would be 1.5730000000000002.
    pieces = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))))."))
    assert pieces["house"] == 1.5730000000000004
    assert pieces["sky"] == 1.4641000000000006
    # Brackets left open: all round ones, then the square one: ((1.1 * 1.1) * 1.1) / 1.1.
    assert parse_prompt_attention("[(((x") == [("x", 1.2100000000000004)]


ATTENTION_EDGES = [
    # escapes: the five escaped characters are themselves; a backslash before anything else goes
    ("\\(a\\) \\\\ \\[b\\]", [("(a) \\ [b]", 1.0)]),
    ("a\\b c\\", [("ab c", 1.0)]),
    # unbalanced: stray closers are text, open brackets apply to the end (round ones first)
    ("a) b] c:", [("a) b] c:", 1.0)]),
    ("(a [b", [("a ", 1.1), ("b", 1.1 * (1 / 1.1))]),
    ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 * (1 / 1.1))]),
    ("(a:1.5", [("a:1.5", 1.1)]),
    ("x:1.2) y", [("x:1.2) y", 1.0)]),
    # explicit weights: signs, a leading dot, spaces, no weight
    ("(a:-1.5) (b:+.5) (c: 2 ) (d:e)", [("a", -1.5), (" ", 1), ("b", 0.5), (" ", 1), ("c", 2.0), (" ", 1), ("d:e", 1.1)]),
    ("((a:2):3)", [("a", 6.0)]),
    # nesting across kinds: each closing bracket multiplies what it closes, in order
    ("([a] b)", [("a", (1 / 1.1) * 1.1), (" b", 1.1)]),
    # empty and BREAK
    ("", [("", 1.0)]),
    ("()[]", [("", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a, BREAK, b", [("a,", 1.0), ("BREAK", -1.0), (", b", 1.0)]),
    ("a break b aBREAK BREAKb Break", [("a break b aBREAK BREAKb Break", 1.0)]),
    ("(a) BREAK (b)", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
    # A BREAK inside brackets has its weight multiplied too (the encoder then reads it as a word).
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
]


@pytest.mark.parametrize("text, expected", ATTENTION_EDGES)
def test_attention_edge_cases_follow_a1111(text, expected):
    assert_pieces(parse_prompt_attention(text), expected)


def test_attention_returns_tuples_of_str_and_float():
    for text, weight in parse_prompt_attention("a (b) BREAK [c]"):
        assert type(text) is str and type(weight) is float


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:" + "9" * 400 + ")"])
def test_attention_weight_that_is_no_number_is_one_clear_error(text):
    with pytest.raises(ValueError, match="not a number") as error:
        parse_prompt_attention(text)
    assert "\n" not in str(error.value)


def _repeated_product(multiplier, times):
    weight = 1.0
    for _ in range(times):
        weight *= multiplier
    return weight


@pytest.mark.parametrize(
    "text, multiplier",
    [
        ("(" * 1000 + "x" + ")" * 1000, 1.1),
        ("[" * 1000 + "x" + "]" * 1000, 1 / 1.1),
        ("(" * 1000 + "x", 1.1),  # never closed: applied at the end
        ("(" * 1000 + "x" + ":1.1)" * 1000, 1.1),
    ],
)
def test_attention_takes_1000_nested_brackets_without_recursion(text, multiplier):
    assert_pieces(parse_prompt_attention(text), [("x", _repeated_product(multiplier, 1000))])


CIVITAI_UNIT = "(masterpiece:1.2), best quality, [[blurry]], a (red:0.8) \\(fox\\) BREAK in ((snow)), "
CIVITAI_UNIT_PIECES = [
    ("masterpiece", 1.2),
    (", best quality, ", 1.0),
    ("blurry", (1 / 1.1) * (1 / 1.1)),
    (", a ", 1.0),
    ("red", 0.8),
    (" (fox)", 1.0),
    ("BREAK", -1.0),
    ("in ", 1.0),
    ("snow", 1.1 * 1.1),
    (", ", 1.0),
]


def repeated(unit, chars):
    """The unit repeated to at least ``chars`` characters."""
    return unit * -(-chars // len(unit))


def _best_time(function, text, repeats=3):
    """The least CPU time of this process over ``repeats`` runs: complexity, not speed. CPU time, not
    wall time, so that other processes on the machine (a loaded CI box) do not count; and with
    Python's cyclic garbage collector paused, whose passes grow with every live object of the run
    (measured on a CI box: 41x the time for 10x the text with it, the parser's own cost being linear)."""
    best = math.inf
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.process_time()
            function(text)
            best = min(best, time.process_time() - start)
    finally:
        gc.enable()
    return best


def test_attention_parses_a_100000_character_prompt_in_linear_time():
    text = repeated(CIVITAI_UNIT, 100_000)
    assert_pieces(parse_prompt_attention(text), CIVITAI_UNIT_PIECES * text.count(CIVITAI_UNIT))
    # 10x the text may take 10x the time, and more where it outgrows the CPU's caches (up to ~3x
    # per character from 10,000 to 1,000,000 characters); 30x still tells linear from n^2 (100x).
    longer = repeated(CIVITAI_UNIT, 1_000_000)
    assert _best_time(parse_prompt_attention, longer) < 30 * _best_time(parse_prompt_attention, text)


# ---------------------------------------------------------------------------------------------
# prompt_schedules


def steps_of(prompt, steps=10):
    return [[step, text] for step, text in prompt_schedules(prompt, steps)]


def alternating(texts, steps):
    return [[step, texts[(step - 1) % len(texts)]] for step in range(1, steps + 1)]


SCHEDULE_DOCTESTS = [  # A1111 doctest, 10 steps
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", alternating(["a", "(b:1.1)"], 10)),
    ("[fe|]male", alternating(["female", "male"], 10)),
    ("[fe|||]male", alternating(["female", "male", "male", "male"], 10)),
]


@pytest.mark.parametrize("prompt, expected", SCHEDULE_DOCTESTS)
def test_schedules_match_a1111_doctests(prompt, expected):
    assert steps_of(prompt) == expected


def test_schedules_a_pipe_outside_any_alternation_keeps_the_prompt_whole():
    # A1111's doctest says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), written
    # before "|" left the grammar's plain text; with that grammar lark finds no parse, and A1111's
    # function returns the prompt whole, as running it shows.
    assert steps_of("a [{b|d{:.5] c") == [[10, "a [{b|d{:.5] c"]]
    assert steps_of("a | b [c:2]") == [[10, "a | b [c:2]"]]


SCHEDULE_EDGES = [
    # no scheduling syntax: the prompt as it is, weights, escapes and stray brackets included
    ("a (b:1.2) [c] \\(d\\) ((e) f] :g", 10, [[10, "a (b:1.2) [c] \\(d\\) ((e) f] :g"]]),
    ("", 10, [[10, ""]]),
    # a backslash escaping nothing leaves no parse: the prompt whole
    ("[a:b:3] \\", 10, [[10, "[a:b:3] \\"]]),
    ("\\\n[a:b:3]", 10, [[10, "\\\n[a:b:3]"]]),
    # nested editing: every edit's step is listed, even where the text does not change
    ("[[a:b:3]:c:6]", 10, [[3, "a"], [6, "b"], [10, "c"]]),
    ("[a:[b:c:8]:3]", 10, [[3, "a"], [8, "b"], [10, "c"]]),
    ("[[a:b:8]:c:3]", 10, [[3, "a"], [8, "c"], [10, "c"]]),
    ("[from::4] to", 10, [[4, "from to"], [10, " to"]]),
    ("[a:b:3] [c|d]", 4, [[1, "a c"], [2, "a d"], [3, "a c"], [4, "b d"]]),
    # alternation over the steps, each alternation on its own period
    ("[cat|dog] [x|y|z]", 6, [[s, ["cat", "dog"][(s - 1) % 2] + " " + "xyz"[(s - 1) % 3]] for s in range(1, 7)]),
    ("[a|[b:c:2]]", 4, [[1, "a"], [2, "b"], [3, "a"], [4, "c"]]),
    ("[|x]", 3, [[1, ""], [2, "x"], [3, ""]]),
    # when: with a "." a fraction of the steps, int() of the product; without, a step
    ("[a:b:0.25]", 20, [[5, "a"], [20, "b"]]),
    ("[a:b:0.33]", 20, [[int(0.33 * 20), "a"], [20, "b"]]),
    ("[a:b:0.999]", 20, [[19, "a"], [20, "b"]]),
    ("[a:b:1.0]", 20, [[20, "a"]]),
    ("[a:b:1]", 20, [[1, "a"], [20, "b"]]),
    ("[a:b:2.]", 20, [[20, "a"]]),
    ("[a:b:1e1]", 20, [[10, "a"], [20, "b"]]),
    ("[a:b:+7]", 20, [[7, "a"], [20, "b"]]),
    ("[a:b:0]", 20, [[20, "b"]]),
    ("[a:b:0.01]", 20, [[20, "b"]]),
    ("[a:b:-3]", 20, [[20, "b"]]),
    ("[a:b:25]", 20, [[20, "a"]]),
    ("[a:b:1e999]", 20, [[20, "a"]]),  # A1111 crashes (int of an infinite float); "never" here
    ("[a:b:3]", 1, [[1, "a"]]),
    # not an edit: the last part is no number, or more than two colons
    ("[a:b:c] [d:e:f:3]", 10, [[10, "[a:b:c] [d:e:f:3]"]]),
    ("[a:b:3x]", 10, [[10, "[a:b:3x]"]]),
    ("[a:(1)]", 10, [[10, "[a:(1)]"]]),
    ("[a:b:(3)] [c:2]", 10, [[2, "[a:b:(3)] "], [10, "[a:b:(3)] c"]]),
    # a group that is not well formed may hold no "|" nor be part of an edit
    ("[a|b:1] [c:2]", 10, [[10, "[a|b:1] [c:2]"]]),
    ("(a|b) [c:2]", 10, [[10, "(a|b) [c:2]"]]),
    ("[(a:b:c):2]", 10, [[10, "[(a:b:c):2]"]]),
    # a malformed group makes the groups around it text, its own inner groups still count
    ("(x:y:[a:b:3] z)", 10, [[3, "(x:y:a z)"], [10, "(x:y:b z)"]]),
    ("([a:b:3] z]", 10, [[3, "(a z]"], [10, "(b z]"]]),
    # newlines are text
    ("a\n[b:c:2]\n", 10, [[2, "a\nb\n"], [10, "a\nc\n"]]),
]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULE_EDGES)
def test_schedules_edge_cases_follow_a1111(prompt, steps, expected):
    assert steps_of(prompt, steps) == expected


def test_schedules_read_an_edit_before_a_stray_bracket_as_an_edit():
    # "[a:1]]" has two parses under A1111's grammar and lark picks one by the process's string
    # hash seed (run A1111's function under PYTHONHASHSEED=0 and =2 to see both). We always read
    # the edit, one of A1111's answers.
    assert steps_of("[a:1]]") == [[1, "]"], [10, "a]"]]
    assert steps_of("([a:b:3]:c)") == [[3, "(a:c)"], [10, "(b:c)"]]


def test_schedules_without_syntax_return_the_very_prompt():
    prompt = "a (red:1.3) fox, [[blurry]], \\[x\\] BREAK y"
    assert prompt_schedules(prompt, 25) == [(25, prompt)]


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, None])
def test_schedules_refuse_steps_that_are_not_a_positive_int(steps):
    with pytest.raises(ValueError, match="steps"):
        prompt_schedules("a [b:c:2]", steps)


def test_schedules_take_1000_nested_groups_without_recursion():
    deep = "[" * 999 + "[a:b:3]" + "]" * 999
    assert steps_of(deep) == [[3, "[" * 999 + "a" + "]" * 999], [10, "[" * 999 + "b" + "]" * 999]]
    edits = "[" * 1000 + "x" + ":5]" * 1000  # [[[x:5]:5]:5]...: nothing until step 5, then x
    assert steps_of(edits) == [[5, ""], [10, "x"]]


def test_schedules_of_a_100000_character_prompt_in_linear_time():
    unit = "(masterpiece:1.2), a [cat:dog:0.5] on [grass|snow], "
    text = repeated(unit, 100_000)
    count = text.count(unit)
    assert prompt_schedules(text, 4) == [
        (1, "(masterpiece:1.2), a cat on grass, " * count),
        (2, "(masterpiece:1.2), a cat on snow, " * count),
        (3, "(masterpiece:1.2), a dog on grass, " * count),
        (4, "(masterpiece:1.2), a dog on snow, " * count),
    ]
    longer = repeated(unit, 1_000_000)  # as for parse_prompt_attention: 30x for 10x, not n^2
    assert _best_time(lambda t: prompt_schedules(t, 4), longer) < 30 * _best_time(lambda t: prompt_schedules(t, 4), text)


# ---------------------------------------------------------------------------------------------
# extract_loras

LORA_CASES = [
    ("a cat <lora:film:0.7>, snow", ("a cat , snow", [("film", 0.7)])),
    ("<lora:film>", ("", [("film", 1.0)])),
    ("<lora:a:0.5> x <lora:b:-1> <lora:a:2>", (" x  ", [("a", 0.5), ("b", -1.0), ("a", 2.0)])),  # in order
    ("<lyco:old:0.3>", ("", [("old", 0.3)])),  # A1111's alias for its Lora network
    ("<lora:film: 0.7 >", ("", [("film", 0.7)])),  # A1111's float() takes the spaces
    ("<lora:film:te=0.4>", ("", [("film", 0.4)])),
    ("<lora:film:0.6:0.6>", ("", [("film", 0.6)])),
    ("<lora:film:0.6:unet=0.6>", ("", [("film", 0.6)])),
    ("<lora:x=y=z:0.5>", ("", [("x=y=z", 0.5)])),  # split("=", 2) gives 3 parts: positional
    # other kinds are removed and not returned (A1111 removes them, then skips unknown ones)
    ("a <hypernet:anime:1> b <LORA:x:1> <foo:bar>", ("a  b  ", [])),
    # no tag: the text unchanged
    ("a <3 you, <b>bold</b>, <lora>, <:x>", ("a <3 you, <b>bold</b>, <lora>, <:x>", [])),
]


@pytest.mark.parametrize("text, expected", LORA_CASES)
def test_extract_loras_follows_a1111s_extra_network_syntax(text, expected):
    assert extract_loras(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("a <lora:film:strong>", "'strong' is not a number"),
        ("<lora:film:nan>", "not a number"),
        ("<lora:film:-inf>", "not a number"),
        ("<lora::0.5>", "has no name"),
        ("<lora:te=0.5>", "has no name"),
        ("<lora:film:0.6:0.3>", "UNet weight"),
        ("<lora:film:0.6:unet=x>", "not a number"),
        ("<lora:film:1:1:8>", "rank"),
        ("<lora:film:dyn=8>", "rank"),
    ],
)
def test_extract_loras_refuses_a_bad_tag_in_one_line_naming_it(text, message):
    with pytest.raises(ValueError, match=message) as error:
        extract_loras(text)
    tag = text[text.index("<") :]
    assert tag in str(error.value) and "\n" not in str(error.value)


def test_option_names_are_the_agreed_ones():
    assert SYNTAXES == ("a1111", "none")
    assert EMPHASES == ("Original", "No norm", "None")
