"""The second toy task: find the one pair of digits that adds up to a target, by trying pairs.

A problem is a list of distinct digits and a target that exactly one pair of them sums to. The chain of thought
tries pairs, one line each, the smaller digit first, checking each written sum against the target, until one
fits or ``MAX_TRIES`` pairs have been tried:

    Which two of 7 2 9 4 5 add up to 11?   ->   <think>
                                               4+5=9 no
                                               2+7=9 no
                                               2+9=11 yes
                                               </think>
                                               \\boxed{2+9}

Each line is a choice among the pairs not tried yet, which is what soft thinking claims to help with: keeping
several candidate paths open instead of committing to one. The teacher tries the pairs in a random order (fresh
at every visit), so the warm-started model guesses; with 3 to 21 pairs and three tries, a guess that finds the
pair early is what the reward pays for, and the longer lists stay hard: pass@k grows with k and does not reach 1
at once. RL can do better than guessing (a target of 15 rules out the small digits). After ``MAX_TRIES`` misses
the teacher answers its last pair (wrong). The answer names the pair smaller digit first, checked exactly (the
``toy`` reward).

Everything a line needs is one token away: the digits are single tokens copied from the question, and a line's
sum is a one-digit addition, as in the addition task's columns. (Two-digit numbers at random places in the
question were more than the 0.5M-parameter model learned to copy.)

The teacher may slip (``worked``'s ``slip``): a written sum is off by one with that probability, and the check
follows what was written (a slipped line can hide the right pair, or stop on a wrong one).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from soft_rl.data import build_user_prompt
from soft_rl.toy.task import draw_splits

THINK_END = "</think>"
MAX_TRIES = 3  # pairs the chain of thought tries before it gives up (about 40 tokens with the answer: the budget is 48)


@dataclass(frozen=True)
class PairSumProblem:
    numbers: tuple[int, ...]
    target: int

    @property
    def question(self) -> str:
        return f"Which two of {' '.join(map(str, self.numbers))} add up to {self.target}?"

    def pairs(self) -> list[tuple[int, int]]:
        """Index pairs (i, j), i < j in list order."""
        return list(itertools.combinations(range(len(self.numbers)), 2))

    def solution(self) -> tuple[int, int]:
        hits = [(i, j) for i, j in self.pairs() if self.numbers[i] + self.numbers[j] == self.target]
        if len(hits) != 1:
            raise ValueError(f"{self.question} has {len(hits)} solutions, not one")
        return hits[0]

    def _name(self, pair: tuple[int, int]) -> str:
        """``a+b``, the smaller digit first."""
        a, b = sorted((self.numbers[pair[0]], self.numbers[pair[1]]))
        return f"{a}+{b}"

    @property
    def answer(self) -> str:
        return self._name(self.solution())

    def worked(self, rnd: random.Random | None = None, slip: float = 0.0) -> tuple[str, str]:
        """(the tried lines ``a+b=s yes|no``, the answer they lead to). Without ``rnd`` the pairs are tried in
        list order; with it in a random order, each written sum off by one with probability ``slip``. The search
        stops at the first written sum equal to the target, or after ``MAX_TRIES`` lines, answering the last
        pair tried."""
        order = self.pairs()
        if rnd is not None:
            rnd.shuffle(order)
        lines = []
        for pair in order[:MAX_TRIES]:
            s = self.numbers[pair[0]] + self.numbers[pair[1]]
            if rnd is not None and slip > 0 and rnd.random() < slip:
                s += rnd.choice((-1, 1))
            lines.append(f"{self._name(pair)}={s} {'yes' if s == self.target else 'no'}")
            if s == self.target:
                break
        return "\n".join(lines), self._name(pair)

    def thought(self) -> str:
        return self.worked(None)[0]

    def response(self, rnd: random.Random | None = None, slip: float = 0.0) -> str:
        lines, answer = self.worked(rnd, slip)
        return f"{lines}\n{THINK_END}\n\\boxed{{{answer}}}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": build_user_prompt(self.question)}]

    def row(self) -> dict:
        return {"prompt": self.messages(), "answer": self.answer, "data_source": "toy_pairsum",
                "solution": self.response(), "numbers": list(self.numbers), "target": self.target}


@dataclass(frozen=True)
class PairSumConfig:
    min_numbers: int = 3
    max_numbers: int = 7
    low: int = 0
    high: int = 9
    num_train: int = 20000
    num_test: int = 500


def sample_problem(rnd: random.Random, cfg: PairSumConfig) -> PairSumProblem:
    """A list size uniform in [min_numbers, max_numbers], then distinct numbers in [low, high] and a random pair's
    sum as the target, redrawn at that size until no other pair hits it (so long lists, where unique sums are
    rarer, are as common as short ones)."""
    m = rnd.randint(cfg.min_numbers, cfg.max_numbers)
    while True:
        numbers = tuple(rnd.sample(range(cfg.low, cfg.high + 1), m))
        i, j = sorted(rnd.sample(range(m), 2))
        target = numbers[i] + numbers[j]
        if sum(numbers[a] + numbers[b] == target for a, b in itertools.combinations(range(m), 2)) == 1:
            return PairSumProblem(numbers, target)


def make_splits(seed: int, cfg: PairSumConfig) -> tuple[list[PairSumProblem], list[PairSumProblem]]:
    """(train, test): distinct problems, no test problem in train, deterministic for ``seed``."""
    return draw_splits(random.Random(f"toy-pairsum-{seed}"), lambda rnd: sample_problem(rnd, cfg), cfg.num_train,
                       cfg.num_test)
