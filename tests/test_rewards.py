"""Reward functions: answer extraction, math-verify equivalences, numeric/format/toy, the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soft_rl.rewards import StripStringError, get_reward, known_rewards, last_boxed, register, strip_string

ROOT = Path(__file__).resolve().parents[1]

BENCHMARKS = ROOT / "data" / "benchmarks"
BENCHMARK_FILES = ["aime2024", "amc23", "gsm8k", "math500"]

math_reward = get_reward("math")
math_strict = get_reward("math_strict")
math_whole = get_reward("math_whole")
numeric = get_reward("numeric")
fmt = get_reward("format")
toy = get_reward("toy")


def _golds(name: str) -> list[str]:
    return [row["final_answer"] for row in json.loads((BENCHMARKS / f"{name}.json").read_text())]


# --------------------------------------------------------------------------------------------------
# last_boxed
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {7}", "7"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not structure
        ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
        ("\\boxed{}", ""),
        ("no box here: 42", None),
        ("\\boxed{5} and then \\boxed{6", None),  # a truncated last box is no answer
        ("\\boxed", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_handles_deep_nesting_and_huge_strings():
    depth = 200_000  # a recursive matcher would overflow the stack long before this
    assert last_boxed("\\boxed{" + "{" * depth + "x" + "}" * depth + "}") == "{" * depth + "x" + "}" * depth
    assert last_boxed("x" * 5_000_000 + "\\boxed{3}") == "3"
    assert last_boxed("\\boxed{" + "{" * depth) is None


# --------------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARK_FILES)
def test_every_benchmark_gold_verifies_against_itself(name):
    golds = _golds(name)
    failed = [g for g in golds if math_reward(f"Reasoning... so the answer is \\boxed{{{g}}}.", g) != 1.0]
    assert not failed, f"{len(failed)}/{len(golds)} golds of {name} do not verify: {failed[:10]}"


def test_every_gsm8k_gold_passes_numeric():
    golds = _golds("gsm8k")
    assert [g for g in golds if numeric(f"\\boxed{{{g}}}", g) != 1.0] == []


@pytest.mark.parametrize(
    "response, gold",
    [
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}"),
        ("\\boxed{\\tfrac12}", "\\frac{1}{2}"),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\left(3,\\frac{\\pi}{2}\\right)}", "(3, \\frac{\\pi}{2})"),
        ("\\boxed{\\$18}", "18"),
        ("\\boxed{18 dollars}", "18"),
        ("\\boxed{18\\text{ dollars}}", "18"),
        ("\\boxed{\\$18.00}", "18"),
        ("\\boxed{5\\text{ cm}}", "5"),
        ("\\boxed{5 apples}", "5"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed {5}", "5"),
        ("\\fbox{5}", "5"),
        ("\\boxed{2125}", "2,125"),
        ("\\boxed{2,125}", "2125"),
        ("\\boxed{1, -2}", "-2,1"),
        ("\\boxed{9i+6}", "6+9i"),
        ("\\boxed{2\\sqrt{5}}", "2 \\sqrt{5}"),
        ("\\boxed{76}", "76^\\circ"),
        ("</think> The answer is \\boxed{\\frac{1}{4}}.", "\\frac{1}{4}"),
    ],
)
def test_math_accepts_equivalent_forms(response, gold):
    assert math_reward(response, gold) == 1.0


@pytest.mark.parametrize(
    "response, gold",
    [
        ("\\boxed{6}", "5"),
        ("\\boxed{0.6}", "\\frac{1}{2}"),
        ("\\boxed{4.6667}", "\\frac{14}{3}"),
        ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{19 dollars}", "18"),
        ("\\boxed{x = 6}", "5"),
        ("\\boxed{2 x}", "2"),  # a single letter is a variable, not a unit
        ("\\boxed{1, 2}", "\\{1, 2, 3\\}"),
        ("\\boxed{}", "5"),
        ("The answer is 5.", "5"),  # no box, no reward
        ("\\boxed{5} wait, no: \\boxed{6}", "5"),  # only the last box counts
        ("\\boxed{5} and then \\boxed{5", "5"),  # truncated last box
    ],
)
def test_math_rejects_different_answers(response, gold):
    assert math_reward(response, gold) == 0.0


def test_math_last_box_wins():
    response = "First guess \\boxed{5}. Rechecking... the answer is \\boxed{6}."
    assert math_reward(response, "6") == 1.0
    assert math_reward(response, "5") == 0.0


def test_math_never_executes_the_answer(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path('{marker}').write_text('x')"
    assert math_reward(f"\\boxed{{{code}}}", "5") == 0.0
    assert numeric(f"\\boxed{{{code}}}", "5") == 0.0
    assert not marker.exists()


def test_math_empty_gold_raises():
    with pytest.raises(ValueError, match="empty gold"):
        math_reward("\\boxed{5}", "  ")


# --------------------------------------------------------------------------------------------------
# strip_string and math_strict (the official training reward)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("a\nb", "ab"),  # linebreaks
        ("1\\!000", "1000"),  # negative thin space
        ("a\\\\b", "a\\b"),  # \\ -> \
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac{1}{2}", "\\frac{1}{2}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("90^{\\circ}", "90"),
        ("90^\\circ", "90"),
        ("\\$18", "18"),
        ("$18", "$18"),  # a bare dollar stays
        ("5 \\text{ cm}", "5"),  # units: cut at "\text{ " (with the space)
        ("5\\text{cm}", "5\\text{cm}"),  # no space after the brace: not a unit
        ("50\\%", "50"),
        ("50%", "50%"),  # a bare percent stays
        (".5", "\\frac{1}{2}"),  # leading dot -> 0.5 -> the special case
        (".25", "0.25"),
        ("x = .25", "0.25"),  # " ." -> " 0."
        ("\\frac{.5}{2}", "\\frac{0.5}{2}"),  # "{." -> "{0."
        ("x = 5", "5"),
        ("k=5", "5"),
        ("xy = 5", "xy=5"),  # "xy " is three characters: kept
        ("a = b = 5", "a=b=5"),  # two "=": kept
        ("\\sqrt3", "\\sqrt{3}"),
        ("2\\sqrt{3}", "2\\sqrt{3}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{2}", "\\frac{1}{2}"),
        ("\\frac{1}2", "\\frac{1}2"),  # only a frac not followed by "{" is rewritten
        ("\\frac1", "\\frac1"),  # too short: the whole string is left alone
        ("0.5", "\\frac{1}{2}"),
        ("0.50", "0.50"),
        ("2/3", "\\frac{2}{3}"),
        ("-2/3", "\\frac{-2}{3}"),
        ("02/3", "02/3"),  # not the canonical spelling of int/int
        ("2/3/4", "2/3/4"),
        ("a/b", "a/b"),
        ("", ""),
    ],
)
def test_strip_string(raw, expected):
    assert strip_string(raw) == expected


@pytest.mark.parametrize("raw", ["2\\sqrt", "\\frac", "1 \\text{ a} 2 \\text{ b}"])
def test_strip_string_fails_where_the_official_does(raw):
    with pytest.raises(StripStringError):
        strip_string(raw)


def test_strip_string_is_linear_on_huge_input():
    assert strip_string("1" * 2_000_000 + "x/3") == "1" * 2_000_000 + "x/3"
    assert len(strip_string("\\frac12" * 200_000)) == len("\\frac{1}{2}") * 200_000
    assert len(strip_string("\\sqrt3" * 200_000)) == len("\\sqrt{3}") * 200_000


@pytest.mark.parametrize("name", BENCHMARK_FILES)
def test_every_benchmark_gold_is_strictly_equal_to_itself(name):
    golds = _golds(name)
    failed = [g for g in golds if math_strict(f"Reasoning... so the answer is \\boxed{{{g}}}.", g) != 1.0]
    assert not failed, f"{len(failed)}/{len(golds)} golds of {name} fail math_strict: {failed[:10]}"


@pytest.mark.parametrize(
    "response, gold",
    [
        ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed{5 \\text{ cm}}", "5"),
        ("\\boxed{\\left(1,2\\right)}", "(1,2)"),
        ("\\boxed{(1, 2)}", "\\left( 1, 2 \\right)"),
        ("\\boxed{2/3}", "\\frac{2}{3}"),
        ("\\boxed{\\sqrt3}", "\\sqrt{3}"),
        ("\\boxed{76}", "76^\\circ"),
        ("\\boxed{50}", "50\\%"),
        ("\\boxed{\\$18}", "18"),
        ("\\boxed{.5}", "0.5"),
        ("<think>\\boxed{3}</think> The answer is \\boxed{\\frac{1}{4}}.", "\\frac{1}{4}"),
        ("\\boxed{2\\sqrt}", "2\\sqrt"),  # strip_string fails on both: raw equality
    ],
)
def test_math_strict_accepts(response, gold):
    assert math_strict(response, gold) == 1.0


@pytest.mark.parametrize(
    "response, gold",
    [
        ("\\boxed{6}", "5"),
        ("\\boxed{5\\text{cm}}", "5\\text{ cm}"),
        ("\\boxed{xy = 5}", "5"),
        ("\\boxed{50\\%}", "50%"),
        ("The answer is 5.", "5"),  # no box
        ("\\boxed{5} and then \\boxed{5", "5"),  # truncated last box
        ("\\boxed{}", "5"),
        ("\\boxed{2\\sqrt}", "2 \\sqrt"),  # the fallback compares raw strings
    ],
)
def test_math_strict_rejects(response, gold):
    assert math_strict(response, gold) == 0.0


@pytest.mark.parametrize(
    "response, gold",
    [
        ("\\boxed{18 dollars}", "18"),
        ("\\boxed{18\\text{ dollars}}", "18.00"),
        ("\\boxed{\\$18.00}", "18"),
        ("\\boxed{2,125}", "2125"),
        ("\\boxed{1, -2}", "-2,1"),
        ("\\boxed{9i+6}", "6+9i"),
        ("\\boxed{0.50}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}"),
        ("\\boxed{2 \\sqrt{5}}", "\\sqrt{20}"),
    ],
)
def test_math_strict_is_stricter_than_math(response, gold):
    assert math_reward(response, gold) == 1.0
    assert math_strict(response, gold) == 0.0


def test_math_strict_last_box_wins():
    response = "First guess \\boxed{5}. Rechecking... the answer is \\boxed{6}."
    assert math_strict(response, "6") == 1.0
    assert math_strict(response, "5") == 0.0


def test_math_strict_empty_gold_raises():
    with pytest.raises(ValueError, match="empty gold"):
        math_strict("\\boxed{}", " ")


# --------------------------------------------------------------------------------------------------
# math_whole (math-verify over the whole response: the official standalone evaluation)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("<think>try 3</think> so the answer is \\boxed{5}.", "5", 1.0),
        ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", 1.0),
        ("The answer is $\\frac{1}{2}$.", "0.5", 1.0),  # no box needed
        ("<think>\\boxed{3}</think> so 5", "3", 1.0),  # a box, even in the thinking, beats a bare number
        ("first 5, then 6", "6", 1.0),  # no box: the last number
        ("\\boxed{5} wait, no: \\boxed{6}", "6", 0.0),  # math-verify reads two boxes as the set {5, 6}
        ("\\boxed{5} wait, no: \\boxed{6}", "5", 0.0),
        ("\\boxed{6}", "5", 0.0),
        ("I do not know.", "5", 0.0),  # nothing to parse
        ("", "5", 0.0),
    ],
)
def test_math_whole(response, gold, expected):
    assert math_whole(response, gold) == expected


def test_math_whole_scores_answers_math_misses():
    response = "The answer is $\\frac{1}{2}$."  # no box: math and math_strict give 0
    assert math_reward(response, "0.5") == 0.0 and math_strict(response, "0.5") == 0.0
    assert math_whole(response, "0.5") == 1.0


# --------------------------------------------------------------------------------------------------
# numeric, format, toy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("She makes 9 * 2 = 18 dollars a day. #### 18", "18", 1.0),
        ("The total is 1,234.5", "1234.5", 1.0),
        ("The total is 1234.5", "1,234.5", 1.0),
        ("so \\boxed{18} and 3 more words", "18", 1.0),  # the box beats a later number
        ("\\boxed{\\$70,000}", "70000", 1.0),
        ("The change is -3", "-3", 1.0),
        ("5-3 = 2", "2", 1.0),
        ("0.3333333", "0.33333333", 1.0),  # within 1e-6 relative
        ("first 18, then 19", "18", 0.0),  # the last number counts
        ("18.001", "18", 0.0),
        ("\\boxed{eighteen}", "18", 0.0),
        ("no digits at all", "18", 0.0),
        ("9" * 100_000, "18", 0.0),
    ],
)
def test_numeric(response, gold, expected):
    assert numeric(response, gold) == expected


def test_numeric_gold_without_number_raises():
    with pytest.raises(ValueError, match="no number"):
        numeric("\\boxed{3}", "three")


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>let me see</think>The answer is \\boxed{3}.", 1.0),
        ("let me see</think>\\boxed{3}", 1.0),  # <think> came with the prompt
        ("<think>a</think>\n\n\\boxed{ 3 }", 1.0),
        ("<think>a</think>The answer is 3.", 0.0),  # no box in the answer
        ("<think>\\boxed{3}</think>The answer is 3.", 0.0),  # box only in the thinking
        ("<think>a</think>", 0.0),  # empty answer
        ("<think>a</think>\\boxed{ }", 0.0),  # blank box
        ("<think>a</think>\\boxed{3", 0.0),  # unclosed box
        ("\\boxed{3}", 0.0),  # no </think>
        ("<think>a</think>b</think>\\boxed{3}", 0.0),  # two </think>
        ("<think><think>a</think>\\boxed{3}", 0.0),  # two <think>
        ("a</think>\\boxed{3}<think>", 0.0),  # <think> after </think>
    ],
)
def test_format(response, expected):
    assert fmt(response, "ignored") == expected


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("\\boxed{abc}", "abc", 1.0),
        ("\\boxed{ abc }", "abc ", 1.0),
        ("\\boxed{abd}", "abc", 0.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 0.0),  # exact match, not math equivalence
        ("abc", "abc", 0.0),
    ],
)
def test_toy(response, gold, expected):
    assert toy(response, gold) == expected


# --------------------------------------------------------------------------------------------------
# Registry and user rewards
# --------------------------------------------------------------------------------------------------


def test_builtin_names():
    assert {"math", "math_strict", "math_whole", "numeric", "format", "toy"} <= set(known_rewards())


def test_unknown_reward_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_reward("mathh")
    message = str(err.value)
    assert "'mathh'" in message
    assert all(name in message for name in ("math", "numeric", "format", "toy"))


def test_user_reward_by_module_and_function():
    fn = get_reward("tests.reward_helpers:exact")
    assert fn("a", "a") == 1.0
    assert fn("a", "b") == 0.0


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("tests.no_such_module:fn", "cannot import module"),
        ("tests.reward_helpers:no_such_fn", "has no attribute"),
        ("tests.reward_helpers:NOT_CALLABLE", "not a callable"),
        ("tests.reward_helpers:", "expected 'package.module:function'"),
    ],
)
def test_user_reward_errors_name_the_spec(spec, fragment):
    with pytest.raises(ValueError) as err:
        get_reward(spec)
    assert repr(spec) in str(err.value)
    assert fragment in str(err.value)


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register("math")(lambda response, gold: 0.0)
