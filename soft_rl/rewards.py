"""Reward functions, registered by name: ``get_reward(name)(response, gold) -> float``.

The trainer's reward is the binary correctness of the *last* ``\\boxed{...}`` in the decoded response
(reference §2.3 "Reward"), judged with math-verify as in the evaluation protocol (§4.1 "Scoring"). Every
function here is pure and deterministic; none of them evaluates model output as code. Hostile output
(an exponent tower that sympy tries to expand, thousands of nested braces) can still make math-verify
run for minutes, so callers that score untrusted text must run these functions under an external
time limit: ``workers/reward.py`` does that in a killable child process. For the same reason the
math-verify calls below pass ``parsing_timeout=None`` / ``timeout_seconds=None``: its own timeout uses
``signal.alarm``, which only works in the main thread of the main interpreter.

Registered names:

- ``math``: math-verify equivalence of the last box with the gold (the default, lenient);
- ``math_strict``: the official SofT-GRPO training reward: the last box and the gold, both normalised
  with the Hendrycks-MATH ``strip_string``, compared for exact string equality;
- ``math_whole``: math-verify over the whole response, not only its last box (the official standalone
  evaluation's scoring; ``soft-rl eval --preset paper``);
- ``numeric``, ``format``, ``toy``.

Any other name of the form ``"package.module:function"`` is imported as a user reward with the same
signature.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import re
from collections import deque
from collections.abc import Callable

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

RewardFn = Callable[[str, str], float]

_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available as ``get_reward(name)``."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def known_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """The reward called ``name``: a registered one, or a user function ``"module:function"``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _import_user_reward(name)
    raise ValueError(
        f"unknown reward {name!r}; known rewards: {', '.join(known_rewards())} "
        "(or a user reward given as 'package.module:function')"
    )


def _import_user_reward(spec: str) -> RewardFn:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"user reward {spec!r}: expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"user reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as e:
            raise ValueError(f"user reward {spec!r}: {module_name!r} has no attribute {attr_path!r}") from e
    if not callable(obj):
        raise ValueError(f"user reward {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a callable")
    return obj


# --------------------------------------------------------------------------------------------------
# Final-answer extraction
# --------------------------------------------------------------------------------------------------


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """The last non-overlapping match of ``pattern`` in ``text`` (one linear scan, O(1) memory)."""
    last = deque(pattern.finditer(text), maxlen=1)
    return last[0] if last else None


# An opener is ``\boxed{``, ``\boxed {`` or ``\fbox{``.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Inside a box we only care about braces; ``\X`` (``\{``, ``\}``, ``\\``) is one escaped unit.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Policy: the last *opener* decides. If its braces never close (a response cut off at the length
    limit) there is no final answer, even if an earlier box is complete. Nested boxes therefore yield
    the innermost last one. Escaped braces ``\\{ \\}`` do not count. Runs in linear time (regex scans,
    no recursion), so megabyte strings and thousands of nested braces are cheap here.
    """
    opener = _last_match(_BOX_OPEN, text)
    if opener is None:
        return None
    depth = 1
    for tok in _BRACE_TOKEN.finditer(text, opener.end()):
        brace = tok.group()
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                return text[opener.end() : tok.start()]
    return None


# --------------------------------------------------------------------------------------------------
# math: math-verify equivalence of the last box with the gold answer
# --------------------------------------------------------------------------------------------------

# LaTeX first (box content is LaTeX), plain expressions (``1/2``) as a fallback, box matched first.
_PARSE_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; here that is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def _mv_parse(latex: str) -> list:
    return parse(latex, extraction_config=_PARSE_CONFIG, parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    """Parsed gold answer (cached: GRPO scores n samples against the same gold).

    A plain gold (``18``, ``\\frac{14}{3}``, ``(3, \\frac{\\pi}{2})``) is wrapped in ``\\boxed{}`` so the
    LaTeX extractor sees exactly one answer; ``$...$`` is the fallback wrapper.
    """
    gold = gold.strip()
    if not gold:
        raise ValueError("math reward: empty gold answer")
    if "\\boxed" in gold or "\\fbox" in gold:
        parsed = _mv_parse(gold)
    else:
        parsed = _mv_parse("\\boxed{" + gold + "}") or _mv_parse("$" + gold + "$")
    if not parsed:
        raise ValueError(f"math reward: cannot parse gold answer {gold[:200]!r}")
    return tuple(parsed)


def _is_unit_word(token: str) -> bool:
    return len(token) >= 2 and token.isascii() and token.isalpha()


def _drop_unit_words(answer: str) -> str:
    """``18 dollars`` -> ``18``; ``\\frac{1}{2} cup`` -> ``\\frac{1}{2}``.

    math-verify strips ``\\text{...}`` units and a fixed list of bare unit words, but not e.g.
    "dollars", which it parses as the product ``d*o*l*l*a*r*s``. Policy: trailing whitespace-separated
    words made only of >= 2 ASCII letters, after a value ending in a digit or ``}``, are units and are
    dropped. Single letters are kept (``2 x`` stays a product), as is anything with a backslash.
    """
    tokens = answer.split()
    keep = len(tokens)
    while keep > 1 and _is_unit_word(tokens[keep - 1]):
        keep -= 1
    if keep == len(tokens) or tokens[keep - 1][-1] not in "0123456789}":
        return answer
    return " ".join(tokens[:keep])


@register("math")
def math_reward(response: str, gold: str) -> float:
    """1.0 iff the last box of ``response`` is mathematically equivalent to ``gold`` (math-verify).

    Equivalences come from math-verify: ``\\frac{1}{2}`` = ``0.5`` = ``\\dfrac12``, ``\\left( \\right)``
    delimiters, ``\\$``, ``\\text{ cm}`` units, ``x = 5`` against ``5``, thousands separators, sets
    in any order. No box -> 0.0.
    """
    boxed = last_boxed(response)
    if boxed is None:
        return 0.0
    pred = _mv_parse("\\boxed{" + _drop_unit_words(boxed) + "}")
    if not pred:
        return 0.0
    # verify(gold, pred) is asymmetric on purpose: the gold decides e.g. whether ``x = 5`` means 5.
    return 1.0 if verify(list(_parse_gold(gold)), pred, timeout_seconds=None) else 0.0


@register("math_whole")
def math_whole_reward(response: str, gold: str) -> float:
    """1.0 iff math-verify's answer extracted from the *whole* response is equivalent to ``gold``.

    The scoring of the official standalone evaluation: the full completion (thinking included) goes to
    math-verify's parser (same extraction config as ``math``: a box is preferred, else the last LaTeX or
    plain expression it finds), then ``verify`` against the parsed gold. No parse -> 0.0.
    """
    pred = _mv_parse(response)
    if not pred:
        return 0.0
    return 1.0 if verify(list(_parse_gold(gold)), pred, timeout_seconds=None) else 0.0


# --------------------------------------------------------------------------------------------------
# math_strict: Hendrycks-MATH string normalisation, exact equality (the official training reward)
# --------------------------------------------------------------------------------------------------


class StripStringError(ValueError):
    """``strip_string`` met an input on which the official normalisation fails (it raises there)."""


def _remove_right_units(s: str) -> str:
    """``5 \\text{ cm}`` -> ``5 ``: cut at ``\\text{ `` (with the space). Two of them: the official fails."""
    marker = "\\text{ "
    count = s.count(marker)
    if count == 0:
        return s
    if count > 1:
        raise StripStringError(f"{count} occurrences of {marker!r}")
    return s[: s.index(marker)]


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``: a one-character radicand gets braces. ``\\sqrt`` at the end: fails."""
    pieces = s.split("\\sqrt")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise StripStringError("\\sqrt without an argument")
        if piece[0] == "{":
            out.append("\\sqrt" + piece)
        else:
            out.append("\\sqrt{" + piece[0] + "}" + piece[1:])
    return "".join(out)


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``.

    Each ``\\frac`` not followed by ``{`` takes its next character as the numerator and, unless that
    is followed by ``{``, the character after as the denominator. A ``\\frac`` with fewer than two
    characters after it leaves the whole string unchanged; one with none fails (as the official does).
    """
    pieces = s.split("\\frac")
    out = [pieces[0]]
    for piece in pieces[1:]:
        out.append("\\frac")
        if not piece:
            raise StripStringError("\\frac without an argument")
        if piece[0] == "{":
            out.append(piece)
        elif len(piece) < 2:
            return s
        elif piece[1] != "{":
            out.append("{" + piece[0] + "}{" + piece[1] + "}" + piece[2:])
        else:
            out.append("{" + piece[0] + "}" + piece[1:])
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    """``2/3`` -> ``\\frac{2}{3}`` when the whole string is exactly ``int/int`` in canonical form."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    # int() also takes "+3", "03", " 3", "1_0": only the canonical spelling is rewritten.
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def strip_string(s: str) -> str:
    """The Hendrycks-MATH answer normalisation, step by step in its original order.

    Pure, linear-time (plain substring replacements and splits). Raises ``StripStringError`` (a
    ValueError) on the inputs where the official implementation raises: two ``\\text{ `` units, and
    ``\\sqrt`` / ``\\frac`` at the very end of the string.
    """
    # Linebreaks.
    s = s.replace("\n", "")
    # Negative thin spaces ``\!``.
    s = s.replace("\\!", "")
    # ``\\`` (a LaTeX line break) -> ``\``.
    s = s.replace("\\\\", "\\")
    # ``\tfrac`` / ``\dfrac`` -> ``\frac`` (plain substring replacement, as in the original).
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    # Sizing delimiters: ``\left(`` -> ``(``, ``\right)`` -> ``)``.
    s = s.replace("\\left", "").replace("\\right", "")
    # Degrees: ``^{\circ}`` and ``^\circ``.
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    # Dollar signs ``\$`` (a bare ``$`` stays).
    s = s.replace("\\$", "")
    # Units: everything from ``\text{ `` (with its space) on.
    s = _remove_right_units(s)
    # Percent ``\%`` (a bare ``%`` stays).
    s = s.replace("\\%", "")
    # Decimals without a leading zero: `` .5`` -> `` 0.5``, ``{.5`` -> ``{0.5``, and a leading ``.5`` -> ``0.5``.
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    # A short left-hand side: ``x = 5`` / ``k=5`` -> ``5`` when there is exactly one ``=`` and at most two
    # characters (spaces included) before it.
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs) <= 2:
        s = rhs
    # ``\sqrt3`` -> ``\sqrt{3}`` (before removing spaces, as in the original).
    s = _fix_sqrt(s)
    # Spaces (only ' '; tabs and carriage returns stay).
    s = s.replace(" ", "")
    # ``\frac12`` -> ``\frac{1}{2}``.
    s = _fix_fracs(s)
    # The one decimal special-cased by the original.
    if s == "0.5":
        s = "\\frac{1}{2}"
    # ``2/3`` -> ``\frac{2}{3}``.
    return _fix_a_slash_b(s)


@register("math_strict")
def math_strict_reward(response: str, gold: str) -> float:
    """1.0 iff ``strip_string(last box) == strip_string(gold)``: the official SofT-GRPO training reward.

    No box -> 0.0. Where ``strip_string`` fails on either side, the raw box and gold are compared
    instead (the official fallback). Unlike ``math``: no unit words, thousands separators, set order or
    numeric equivalence beyond ``0.5`` = ``\\frac{1}{2}``.
    """
    if not gold.strip():
        raise ValueError("math_strict reward: empty gold answer")
    boxed = last_boxed(response)
    if boxed is None:
        return 0.0
    try:
        return 1.0 if strip_string(boxed) == strip_string(gold) else 0.0
    except StripStringError:
        return 1.0 if boxed == gold else 0.0


# --------------------------------------------------------------------------------------------------
# numeric: GSM8K-style last number
# --------------------------------------------------------------------------------------------------

# A number: optional sign (not a minus between two operands, as in ``5-3``), digits with optional
# thousands commas, optional decimals; or a bare ``.5``.
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_NUMERIC_REL_TOL = 1e-6


def _last_number(text: str) -> float | None:
    match = _last_match(_NUMBER, text)
    if match is None:
        return None
    return float(match.group().replace(",", ""))


@register("numeric")
def numeric_reward(response: str, gold: str) -> float:
    """1.0 iff the last number of the response (of its last box, if it has one) equals ``gold``.

    Commas are removed; equality is ``|pred - gold| <= 1e-6 * max(|pred|, |gold|)`` (math.isclose).
    """
    gold_value = _last_number(gold.strip().replace("\\$", "").replace("$", ""))
    if gold_value is None:
        raise ValueError(f"numeric reward: gold {gold[:200]!r} contains no number")
    boxed = last_boxed(response)
    pred = _last_number(response if boxed is None else boxed)
    if pred is None:
        return 0.0
    return 1.0 if math.isclose(pred, gold_value, rel_tol=_NUMERIC_REL_TOL) else 0.0


# --------------------------------------------------------------------------------------------------
# format and toy
# --------------------------------------------------------------------------------------------------


@register("format")
def format_reward(response: str, gold: str) -> float:
    """1.0 iff ``[<think>] ... </think> answer`` with a non-empty ``\\boxed{}`` in the answer.

    Exactly one ``</think>``; ``<think>`` is optional (chat templates often put it in the prompt) but at
    most once and only before ``</think>``; the answer after ``</think>`` must hold a complete box
    with non-blank content. ``gold`` is ignored.
    """
    if response.count("</think>") != 1:
        return 0.0
    thinking, answer = response.split("</think>")
    if thinking.count("<think>") > 1 or "<think>" in answer:
        return 0.0
    boxed = last_boxed(answer)
    return 1.0 if boxed is not None and boxed.strip() else 0.0


@register("toy")
def toy_reward(response: str, gold: str) -> float:
    """Reserved for the toy task: exact string match of the stripped last box with the stripped gold."""
    boxed = last_boxed(response)
    return 1.0 if boxed is not None and boxed.strip() == gold.strip() else 0.0
