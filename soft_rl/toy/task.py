"""The toy task: column addition of two multi-digit numbers, worked digit by digit with carries.

A problem is a pair of operands (a, b), each with ``min_digits``..``max_digits`` digits. The chain of
thought adds the columns from the right, one line per column, always writing the incoming carry:

    What is 4738 + 956?          ->   <think>
                                      8+6+0=14
                                      3+5+1=9
                                      7+9+0=16
                                      4+0+1=5
                                      </think>
                                      \\boxed{5694}

Column i (from the right) reads the i-th digit of each operand (0 past its end) and the carry out of
column i - 1; the written digit is the column sum mod 10 and the carry its tens digit. The answer is
the written digits read bottom-up, preceded by the last carry when it is 1. Everything the model
needs is in the prompt, and the answer is checked exactly (the ``toy`` reward: the last box equals
the gold string), so a tiny model can learn the task but makes mistakes: reading the wrong digit of
an operand, dropping a carry, or reversing the digits wrongly.

Generation is a pure function of the seed: ``make_splits`` draws the held-out problems first and
excludes them from the training split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from soft_rl.data import build_user_prompt

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class ToyProblem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def thought(self) -> str:
        """One line per column, ``x+y+carry=sum``, right to left (see the module docstring)."""
        return self.worked(None)[0]

    def worked(self, rnd: random.Random | None = None, slip: float = 0.0) -> tuple[str, str]:
        """(the column lines, one per column ``x+y+carry=sum`` right to left, and the answer they spell).

        With ``rnd`` and ``slip`` > 0 this is a sloppy teacher: each column's sum is off by one with
        probability ``slip``, and the carries and the answer follow the sums as written (so the answer is
        then wrong). A model that imitates it makes the same slips at random; RL can remove them.
        """
        da, db = str(self.a)[::-1], str(self.b)[::-1]
        lines, digits, carry = [], [], 0
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            s = x + y + carry
            if rnd is not None and slip > 0 and rnd.random() < slip:
                s = s + 1 if s == 0 or (s < 19 and rnd.random() < 0.5) else s - 1
            lines.append(f"{x}+{y}+{carry}={s}")
            digits.append(str(s % 10))
            carry = s // 10
        answer = ("1" if carry else "") + "".join(reversed(digits))
        return "\n".join(lines), answer.lstrip("0") or "0"

    def response(self, rnd: random.Random | None = None, slip: float = 0.0) -> str:
        """The gold response after the generation prompt (which already ends with ``<think>\\n``); with
        ``rnd`` and ``slip``, the sloppy teacher's (see ``worked``)."""
        lines, answer = self.worked(rnd, slip)
        return f"{lines}\n{THINK_END}\n\\boxed{{{answer}}}"

    def messages(self) -> list[dict[str, str]]:
        """The chat prompt in the reference template (problem + the step-by-step instruction)."""
        return [{"role": "user", "content": build_user_prompt(self.question)}]

    def row(self) -> dict:
        """A JSONL row that ``soft_rl.data.load_problems`` reads (extra fields are ignored there)."""
        return {"prompt": self.messages(), "answer": self.answer, "data_source": "toy_addition",
                "solution": self.response(), "operands": [self.a, self.b]}


@dataclass(frozen=True)
class ToyTaskConfig:
    min_digits: int = 2
    max_digits: int = 4
    num_train: int = 20000
    num_test: int = 500


def sample_problem(rnd: random.Random, cfg: ToyTaskConfig) -> ToyProblem:
    def operand() -> int:
        d = rnd.randint(cfg.min_digits, cfg.max_digits)
        return rnd.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)

    return ToyProblem(operand(), operand())


def make_splits(seed: int, cfg: ToyTaskConfig) -> tuple[list[ToyProblem], list[ToyProblem]]:
    """(train, test): distinct problems, no test problem in train, deterministic for ``seed``."""
    space = sum(9 * 10 ** (d - 1) for d in range(cfg.min_digits, cfg.max_digits + 1)) ** 2
    if cfg.num_train + cfg.num_test > space // 2:
        raise ValueError(f"{cfg.num_train + cfg.num_test} problems requested but only {space} exist")
    return draw_splits(random.Random(f"toy-addition-{seed}"), lambda rnd: sample_problem(rnd, cfg), cfg.num_train,
                       cfg.num_test)


def draw_splits(rnd: random.Random, sample, num_train: int, num_test: int) -> tuple[list, list]:
    """(train, test) of distinct problems drawn with ``sample(rnd)``: the test split first, then the train split
    without any problem already drawn (so none of the test problems)."""
    seen: set = set()

    def draw(n: int) -> list:
        out = []
        while len(out) < n:
            p = sample(rnd)
            if p not in seen:
                seen.add(p)
                out.append(p)
        return out

    test = draw(num_test)
    return draw(num_train), test
