"""The toy task: deterministic splits, verifiable chains of thought, the tokenizer, and ``toy-init``."""

from __future__ import annotations

import json
import re
import time

import pytest

from soft_rl.data import INSTRUCTION, load_problems, render_prompt
from soft_rl.evaluation import response_text
from soft_rl.rewards import get_reward
from soft_rl.toy.init import RECIPES, args_hash, corpus, toy_init, write_jsonl
from soft_rl.toy.model import build_tokenizer
from soft_rl.toy.task import ToyProblem, ToyTaskConfig, make_splits

SMALL = ToyTaskConfig(min_digits=1, max_digits=4, num_train=400, num_test=50)
toy_reward = get_reward("toy")
format_reward = get_reward("format")


@pytest.fixture(scope="module")
def tokenizer():
    train, _ = make_splits(0, SMALL)
    return build_tokenizer(corpus(train))


def test_splits_are_deterministic_distinct_and_disjoint():
    train, test = make_splits(3, SMALL)
    assert (train, test) == make_splits(3, SMALL)
    assert make_splits(4, SMALL) != (train, test)
    assert len(set(train)) == len(train) == SMALL.num_train and len(set(test)) == len(test) == SMALL.num_test
    assert not set(train) & set(test)
    assert all(1 <= len(str(x)) <= 4 for p in train + test for x in (p.a, p.b))


def test_impossible_split_size_is_refused():
    with pytest.raises(ValueError, match="problems requested"):
        make_splits(0, ToyTaskConfig(min_digits=1, max_digits=1, num_train=90, num_test=10))


def _check_thought(p: ToyProblem) -> str:
    """Re-derive the answer from the written columns, checking every line's arithmetic and carry."""
    thought, answer = p.response().split("</think>")
    digits, carry = [], 0
    da, db = str(p.a)[::-1], str(p.b)[::-1]
    lines = thought.strip().split("\n")
    assert len(lines) == max(len(da), len(db))
    for i, line in enumerate(lines):
        x, y, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+)", line).groups())
        assert x == (int(da[i]) if i < len(da) else 0) and y == (int(db[i]) if i < len(db) else 0)
        assert c == carry and s == x + y + c
        digits.append(s % 10)
        carry = s // 10
    value = int("".join(map(str, ([carry] if carry else []) + digits[::-1])))
    assert answer.strip() == f"\\boxed{{{value}}}"
    return str(value)


@pytest.mark.parametrize("problem", [ToyProblem(4738, 956), ToyProblem(99, 1), ToyProblem(0, 0), ToyProblem(5, 95)])
def test_thought_is_column_addition(problem):
    assert _check_thought(problem) == problem.answer == str(problem.a + problem.b)


def test_examples_thoughts_and_rewards(tokenizer):
    train, test = make_splits(0, SMALL)
    for p in train[:100] + test:
        assert _check_thought(p) == p.answer
    p = ToyProblem(4738, 956)
    assert p.thought() == "8+6+0=14\n3+5+1=9\n7+9+0=16\n4+0+1=5"
    assert p.answer == "5694"
    # The gold response, as the model would emit it (tokens, then decoded as the evaluator does), scores 1.
    ids = list(tokenizer.encode(p.response(), add_special_tokens=False)) + [tokenizer.eos_token_id]
    text = response_text(tokenizer, ids)
    assert text == p.response()
    assert toy_reward(text, p.answer) == 1.0 and format_reward(text, p.answer) == 1.0
    # Corrupted answers score 0: off by one, a dropped carry, reversed digits, no box.
    for bad in ("5695", "4694", "4965", ""):
        assert toy_reward(p.response().replace("\\boxed{5694}", f"\\boxed{{{bad}}}"), p.answer) == 0.0
    assert toy_reward(p.thought(), p.answer) == 0.0


def test_tokenizer_digits_and_markers(tokenizer):
    for marker in ("<think>", "</think>", "<|im_end|>"):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1
    ids = tokenizer.encode("4738+956", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == list("4738+956")  # one token per digit
    p = ToyProblem(12, 345)
    prompt = tokenizer.decode(render_prompt(tokenizer, p.messages()))
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") and p.question in prompt


def test_rows_load_with_the_data_loader(tmp_path):
    _, test = make_splits(0, SMALL)
    write_jsonl(tmp_path / "t.jsonl", test)
    loaded = load_problems(tmp_path / "t.jsonl").problems
    assert [q.answer for q in loaded] == [p.answer for p in test]
    assert [q.prompt for q in loaded] == [p.messages() for p in test]  # the instruction is not appended twice
    assert loaded[0].prompt[0]["content"].count(INSTRUCTION.strip()) == 1


def test_args_hash_covers_every_argument():
    base = args_hash(0, "tiny", 1.0, 30)
    assert base == args_hash(0, "tiny", 1.0, 30)
    assert len({base, args_hash(1, "tiny", 1.0, 30), args_hash(0, "default", 1.0, 30),
                args_hash(0, "tiny", 2.0, 30), args_hash(0, "tiny", 1.0, 31), args_hash(0, "tiny", 1.0, 30, 2)}) == 6


def test_toy_init_builds_a_loadable_model_and_caches(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soft_rl.cli import main

    out = tmp_path / "toy"
    t0 = time.time()
    report = toy_init(out, seed=0, size="tiny", minutes=1.0, steps=40, log=lambda s: None)
    assert time.time() - t0 < 40
    assert report["cached"] is False and report["warm_start"]["steps"] == 40
    assert report["warm_start"]["final_loss"] < 0.5 * report["warm_start"]["first_loss"]
    assert 0.0 <= report["heldout_accuracy_soft"] <= 1.0 and 0.0 <= report["heldout_accuracy_discrete"] <= 1.0
    assert json.loads((out / "toy_init.json").read_text())["args_hash"] == report["args_hash"]
    assert len(load_problems(out / "train.jsonl").problems) == 2000
    assert len(load_problems(out / "test.jsonl").problems) == 64

    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and len(tok.encode("</think>", add_special_tokens=False)) == 1
    prompt = render_prompt(tok, load_problems(out / "test.jsonl").problems[0].prompt)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits
    assert torch.isfinite(logits).all()
    gen_cfg = json.loads((out / "model" / "generation_config.json").read_text())
    assert not {"temperature", "top_k", "top_p", "do_sample"} & set(gen_cfg)

    # Second call with the same arguments (through the CLI): cache hit, nothing rewritten.
    weights = out / "model" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.time()
    assert main(["toy-init", str(out), "--size", "tiny", "--minutes", "1", "--steps", "40"]) == 0
    assert time.time() - t0 < 5
    assert weights.stat().st_mtime_ns == mtime
    cached = toy_init(out, seed=0, size="tiny", minutes=1.0, steps=40, log=lambda s: None)
    assert cached["cached"] is True and cached["heldout_accuracy_soft"] == report["heldout_accuracy_soft"]


def test_default_toy_init_copies_the_shipped_model(tmp_path):
    """The default task starts from the model in soft_rl/toy/shipped/ on every machine: the copy is
    byte-identical, the data come from the task's seed, and a second call is a cache hit."""
    from soft_rl.toy.init import SHIPPED, shipped_model_dir

    assert shipped_model_dir() is not None, "the warm-started default model must ship with the repository"
    out = tmp_path / "toy"
    t0 = time.time()
    report = toy_init(out, log=lambda s: None)
    assert time.time() - t0 < 20 and report["source"] == "shipped" and report["cached"] is False
    for f in (SHIPPED / "model").iterdir():
        assert (out / "model" / f.name).read_bytes() == f.read_bytes(), f.name
    shipped = json.loads((SHIPPED / "toy_init.json").read_text())
    assert report["heldout_accuracy_soft"] == shipped["heldout_accuracy_soft"] and shipped["built_on"]
    train, test = make_splits(0, RECIPES["default"].task)
    assert [p.answer for p in load_problems(out / "test.jsonl").problems] == [p.answer for p in test]
    assert len(load_problems(out / "train.jsonl").problems) == len(train)
    assert toy_init(out, log=lambda s: None)["cached"] is True


@pytest.mark.slow
def test_rebuild_here_reaches_the_shipped_accuracy(tmp_path):
    """`toy-init --rebuild` on the machine at hand trains a model whose held-out accuracy (256 problems,
    one sample each, paper soft settings) is within sampling noise of the shipped one's: about 0.03
    binomial standard deviation each, so 0.12 is a 3-sigma band on the difference."""
    from soft_rl.toy.init import SHIPPED

    shipped = json.loads((SHIPPED / "toy_init.json").read_text())
    report = toy_init(tmp_path / "toy", rebuild=True, minutes=30, log=print)
    assert report["source"] == "built" and not report["warm_start"]["stopped_by_time"]
    print(f"rebuilt: soft {report['heldout_accuracy_soft']:.3f} discrete {report['heldout_accuracy_discrete']:.3f} "
          f"in {report['wall_seconds']:.0f}s; shipped: soft {shipped['heldout_accuracy_soft']:.3f} "
          f"discrete {shipped['heldout_accuracy_discrete']:.3f} ({shipped['built_on']})")
    for key in ("heldout_accuracy_soft", "heldout_accuracy_discrete"):
        assert abs(report[key] - shipped[key]) <= 0.12, (key, report[key], shipped[key])


def test_sloppy_teacher_slips_at_its_rate_and_its_answer_follows_the_slips():
    import random

    rnd = random.Random(1)
    problems = [ToyProblem(rnd.randint(10, 9999), rnd.randint(10, 9999)) for _ in range(3000)]
    cols = slips = 0
    for p in problems:
        clean_lines = p.thought().split("\n")
        lines, answer = p.worked(rnd, 0.3)
        # the answer is what the written sums spell, right or wrong
        digits, carry = [], 0
        for line in lines.split("\n"):
            s = int(line.split("=")[1])
            digits.append(str(s % 10))
            carry = s // 10
        assert answer == (("1" if carry else "") + "".join(reversed(digits))).lstrip("0")
        first = next((i for i, (a, b) in enumerate(zip(lines.split("\n"), clean_lines, strict=True)) if a != b), None)
        cols += len(clean_lines) if first is None else first + 1
        slips += first is not None
        assert (first is None) == (answer == p.answer)
    assert abs(slips / cols - 0.3) < 0.02  # first slips per column visited up to the first slip
    assert p.worked(None, 0.3) == (p.thought(), p.answer)  # no rng: the careful teacher
