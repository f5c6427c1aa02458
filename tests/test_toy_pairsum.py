"""The pair-sum search task: one solution per problem, searches that end where the written sums say, the toy
reward on its answers, disjoint deterministic splits, and ``toy-init --task pairsum``."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from soft_rl.data import load_problems
from soft_rl.rewards import get_reward
from soft_rl.toy.init import args_hash, recipe_for, toy_init
from soft_rl.toy.pairsum import MAX_TRIES, PairSumConfig, PairSumProblem, make_splits

SMALL = PairSumConfig(num_train=600, num_test=60)
toy_reward = get_reward("toy")


def _sums(problem: PairSumProblem) -> list[tuple[int, int, int]]:
    return [(problem.numbers[i], problem.numbers[j], problem.numbers[i] + problem.numbers[j])
            for i, j in itertools.combinations(range(len(problem.numbers)), 2)]


def test_every_problem_has_exactly_one_pair_and_the_answer_names_it_smaller_digit_first():
    train, test = make_splits(0, SMALL)
    sizes = set()
    for p in train + test:
        hits = [(a, b) for a, b, s in _sums(p) if s == p.target]
        assert len(hits) == 1, p
        assert p.answer == f"{min(hits[0])}+{max(hits[0])}"
        assert len(set(p.numbers)) == len(p.numbers) and all(0 <= n <= 9 for n in p.numbers)
        sizes.add(len(p.numbers))
    assert sizes == set(range(SMALL.min_numbers, SMALL.max_numbers + 1))  # every list size occurs


def test_splits_are_deterministic_distinct_and_disjoint():
    train, test = make_splits(3, SMALL)
    assert (train, test) == make_splits(3, SMALL)
    assert len(set(train)) == len(train) and len(set(test)) == len(test) and not set(train) & set(test)
    assert make_splits(4, SMALL)[1] != test


def _lines(lines: str) -> list[tuple[str, int, str]]:
    """(pair expression, written sum, verdict) per tried line ``a+b=s yes|no``."""
    out = []
    for line in lines.split("\n"):
        expr, rest = line.split("=")
        written, verdict = rest.split(" ")
        out.append((expr, int(written), verdict))
    return out


def test_a_clean_search_checks_each_sum_and_stops_at_the_pair_or_after_max_tries():
    rnd = random.Random(0)
    found = 0
    for p in make_splits(1, SMALL)[1]:
        lines, answer = p.worked(rnd, 0.0)
        tried = _lines(lines)
        assert all(sum(map(int, expr.split("+"))) == s for expr, s, _ in tried)  # clean: every sum right
        assert all(int(expr[0]) < int(expr[2]) and {int(expr[0]), int(expr[2])} <= set(p.numbers)
                   for expr, _, _ in tried)  # two digits of the list, the smaller first
        assert all((v == "yes") == (s == p.target) for _, s, v in tried)  # the verdict compares with the target
        assert len({expr for expr, _, _ in tried}) == len(tried) <= MAX_TRIES  # no pair twice, at most MAX_TRIES
        hit = tried[-1][2] == "yes"
        assert answer == tried[-1][0] and (answer == p.answer) == hit and (hit or len(tried) == MAX_TRIES)
        assert toy_reward(f"{lines}\n</think>\n\\boxed{{{answer}}}", p.answer) == float(hit)
        found += hit
    # three tries among 3-21 pairs: the clean teacher finds the pair in 0.41 of the problems (the mean of
    # min(1, 3 / pairs) over the list sizes); binomial sd over 60 problems 0.064, so 0.2-0.62 is a 3-sigma band
    assert 0.2 < found / len(make_splits(1, SMALL)[1]) < 0.62


def test_a_sloppy_search_slips_at_its_rate_and_follows_what_it_wrote():
    rnd = random.Random(2)
    lines_total = slips = 0
    problems = make_splits(2, PairSumConfig(num_train=10, num_test=3000))[1]
    for p in problems:
        lines, answer = p.worked(rnd, 0.2)
        tried = _lines(lines)
        off = [s - sum(map(int, expr.split("+"))) for expr, s, _ in tried]
        assert set(off) <= {-1, 0, 1}
        lines_total += len(off)
        slips += sum(o != 0 for o in off)
        # the verdict follows the written sum; the search stops at the first "yes", answering that pair
        assert all((v == "yes") == (s == p.target) for _, s, v in tried)
        assert [v for _, _, v in tried[:-1]] == ["no"] * (len(tried) - 1) and answer == tried[-1][0]
    assert abs(slips / lines_total - 0.2) < 0.02, slips / lines_total


def test_default_pairsum_init_copies_the_shipped_model(tmp_path):
    """`toy-init --task pairsum` starts from soft_rl/toy/shipped_pairsum/ on every machine: a byte-identical copy,
    the data of the task's seed, a cache hit the second time."""
    from soft_rl.toy.init import SHIPPED_DIRS, shipped_model_dir

    assert shipped_model_dir("pairsum") is not None, "the pair-sum warm start must ship with the repository"
    shipped = SHIPPED_DIRS["pairsum"]
    report = toy_init(tmp_path / "ps", task="pairsum", log=lambda s: None)
    assert report["source"] == "shipped" and report["cached"] is False
    for f in (shipped / "model").iterdir():
        assert (tmp_path / "ps" / "model" / f.name).read_bytes() == f.read_bytes(), f.name
    assert report["args"]["task"] == "pairsum"
    test = make_splits(0, recipe_for("pairsum", "default").task)[1]
    assert [p.answer for p in load_problems(tmp_path / "ps" / "test.jsonl").problems] == [p.answer for p in test]
    assert toy_init(tmp_path / "ps", task="pairsum", log=lambda s: None)["cached"] is True


def test_the_shipped_pairsum_model_searches_the_list():
    """The shipped warm start has learned the search, not the answers: its tried lines name two digits of the list,
    smaller first, mostly with the verdict its written sum calls for; its sums are as sloppy as its teacher's; it finds
    the pair about as often as the teacher's three random tries do. 64 problems x 4 discrete samples on
    transformers. Bounds: the teacher slips on 30% of its sums (binomial sd over some 700 lines 0.02, so 0.55-0.85
    is wide), and its tries find the pair in 0.33 of the problems, 0.41 without slips (sd of the model's rate over
    256 samples of 64 problems about 0.035: 0.10-0.41 reaches from 3 sigma below the model's own rate, 0.24, to
    the slips-free rate)."""
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_rl.data import render_prompt
    from soft_rl.evaluation import EvalSettings, generate_hf
    from soft_rl.toy.init import SHIPPED_DIRS

    d = SHIPPED_DIRS["pairsum"] / "model"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    problems = make_splits(0, recipe_for("pairsum", "default").task)[1][:64]
    settings = EvalSettings.paper(mode="discrete", n=4, max_new_tokens=48, seed=3)
    samples = generate_hf(model, tokenizer, [render_prompt(tokenizer, p.messages()) for p in problems],
                          [f"ps:{i}" for i in range(len(problems))], settings, batch_size=256)
    lines = well_formed = consistent = sums_right = solved = 0
    for group, p in zip(samples, problems, strict=True):
        for sample in group:
            solved += toy_reward(sample.text, p.answer)
            for line in sample.text.split("</think>")[0].strip().split("\n"):
                m = re.fullmatch(r"(\d)\+(\d)=(\d+) (yes|no)", line.strip())
                lines += 1
                if m and int(m[1]) < int(m[2]) and {int(m[1]), int(m[2])} <= set(p.numbers):
                    well_formed += 1
                    consistent += (m[4] == "yes") == (int(m[3]) == p.target)
                    sums_right += int(m[1]) + int(m[2]) == int(m[3])
    assert lines >= 256 and well_formed / lines > 0.95, (well_formed, lines)
    assert consistent / well_formed > 0.8, (consistent, well_formed)  # the teacher's verdicts always follow its sums
    assert 0.55 < sums_right / well_formed < 0.85, (sums_right, well_formed)
    assert 0.10 < solved / 256 < 0.41, solved


def test_args_hash_names_the_task_and_keeps_the_addition_hash():
    assert args_hash(0, "tiny", 1.0, 30) == args_hash(0, "tiny", 1.0, 30, 1, "addition")
    assert args_hash(0, "tiny", 1.0, 30, 1, "pairsum") != args_hash(0, "tiny", 1.0, 30)
    with pytest.raises(ValueError, match="task must be one of"):
        recipe_for("countdown", "tiny")


def test_toy_init_builds_the_pairsum_task(tmp_path):
    report = toy_init(tmp_path / "ps", size="tiny", minutes=1.0, steps=30, task="pairsum", log=lambda s: None)
    assert report["args"]["task"] == "pairsum" and report["warm_start"]["steps"] == 30
    assert report["warm_start"]["final_loss"] < 0.6 * report["warm_start"]["first_loss"]
    rows = [json.loads(line) for line in (tmp_path / "ps" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and all(r["data_source"] == "toy_pairsum" for r in rows)
    problems = load_problems(tmp_path / "ps" / "test.jsonl").problems
    assert [p.answer for p in problems] == [p.answer for p in make_splits(0, recipe_for("pairsum", "tiny").task)[1]]
