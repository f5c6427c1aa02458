"""Problem loaders (JSON, JSONL, parquet, datasets dirs), malformed input, the prompt template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soft_rl.data import (
    INSTRUCTION,
    DataError,
    Problem,
    build_user_prompt,
    filter_overlong,
    load_problems,
    render_prompt,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


def _write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------------------
# Prompt template
# --------------------------------------------------------------------------------------------------


def test_build_user_prompt_is_the_reference_template():
    assert INSTRUCTION == SUFFIX
    assert build_user_prompt("What is 1+1?") == "What is 1+1?" + SUFFIX


# --------------------------------------------------------------------------------------------------
# The benchmark files (data/benchmarks)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, n", [("aime2024", 30), ("amc23", 40), ("gsm8k", 1319), ("math500", 500)])
def test_benchmark_files_load(name, n):
    path = BENCHMARKS / f"{name}.json"
    raw = json.loads(path.read_text())
    report = load_problems(path)
    assert len(report.problems) == n and report.skipped == 0
    assert [p.answer for p in report.problems] == [r["final_answer"].strip() for r in raw]
    assert [p.row for p in report.problems] == list(range(n))
    for p, r in zip(report.problems, raw, strict=True):
        assert p.source == name and p.file == str(path)
        assert p.prompt == _user(build_user_prompt(r["prompt"][0]["value"]))


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def test_json_accepts_sharegpt_and_role_content_messages(tmp_path):
    path = _write_json(tmp_path / "set.json", [
        {"prompt": [{"from": "human", "value": "Q1"}], "final_answer": "1"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q2"}],
         "final_answer": 2, "data_source": "custom"},
        {"prompt": _user("Q3" + SUFFIX), "final_answer": " \\frac{1}{2} "},
    ])
    p1, p2, p3 = load_problems(path).problems
    assert p1 == Problem(prompt=_user("Q1" + SUFFIX), answer="1", source="set", row=0, file=str(path))
    assert p2.prompt == [{"role": "system", "content": "Be brief."}, *_user("Q2" + SUFFIX)]
    assert (p2.answer, p2.source) == ("2", "custom")
    assert p3.prompt == _user("Q3" + SUFFIX)  # the instruction is not appended twice
    assert p3.answer == "\\frac{1}{2}"


def test_instruction_can_be_left_out(tmp_path):
    path = _write_json(tmp_path / "set.json", [{"prompt": _user("Q1"), "final_answer": "1"}])
    assert load_problems(path, add_instruction=False).problems[0].prompt == _user("Q1")


def test_jsonl_layouts_and_blank_lines(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(
        json.dumps({"prompt": _user("Q0"), "final_answer": "0"}) + "\n\n"
        + json.dumps({"problem": "Q1", "answer": "1", "source": "mine"}) + "\n"
        + json.dumps({"question": "Q2", "answer": 2.5}) + "\n"
    )
    problems = load_problems(path).problems
    assert [p.prompt for p in problems] == [_user(build_user_prompt(q)) for q in ("Q0", "Q1", "Q2")]
    assert [(p.answer, p.source, p.row) for p in problems] == [
        ("0", "set", 0), ("1", "mine", 1), ("2.5", "set", 2),
    ]


def _verl_table():
    import pyarrow as pa

    return pa.table({
        "data_source": ["deepscaler", "deepscaler"],
        "prompt": [_user("P0" + SUFFIX), _user("P1" + SUFFIX)],
        "ability": ["math", "math"],
        "reward_model": [
            {"style": "rule", "ground_truth": "18"}, {"style": "rule", "ground_truth": "\\frac{1}{3}"},
        ],
        "extra_info": [{"index": 0, "split": "train"}, {"index": 1, "split": "train"}],
    })


def test_parquet_verl_layout(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(_verl_table(), path)
    problems = load_problems(path).problems
    assert [p.answer for p in problems] == ["18", "\\frac{1}{3}"]
    assert [p.prompt for p in problems] == [_user("P0" + SUFFIX), _user("P1" + SUFFIX)]
    assert {p.source for p in problems} == {"deepscaler"}


def test_datasets_directory(tmp_path):
    import datasets

    rows = [{"prompt": _user("D0"), "final_answer": "7"}, {"prompt": _user("D1"), "final_answer": "8"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    problems = load_problems(tmp_path / "ds").problems
    assert [(p.prompt, p.answer, p.source, p.row) for p in problems] == [
        (_user("D0" + SUFFIX), "7", "ds", 0), (_user("D1" + SUFFIX), "8", "ds", 1),
    ]


def test_datasets_dict_needs_a_split_when_ambiguous(tmp_path):
    import datasets

    test_rows = [{"problem": "E", "answer": "2"}, {"problem": "F", "answer": "3"}]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"problem": "T", "answer": "1"}]),
        "test": datasets.Dataset.from_list(test_rows),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="split"):
        load_problems(tmp_path / "dd")
    assert [p.answer for p in load_problems(tmp_path / "dd", split="test").problems] == ["2", "3"]


# --------------------------------------------------------------------------------------------------
# Malformed files and rows
# --------------------------------------------------------------------------------------------------


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": [], \n "final_answer": }]')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 2"):
        load_problems(path, on_error="skip")  # a broken file is never skipped


def test_json_must_be_an_array(tmp_path):
    path = _write_json(tmp_path / "obj.json", {"prompt": _user("Q"), "final_answer": "1"})
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON array"):
        load_problems(path)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"problem": "Q", "answer": "1"}) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 3: invalid JSON"):
        load_problems(path)


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match=r"fake\.parquet: cannot read parquet"):
        load_problems(path)


BAD_ROWS = [
    ({"prompt": _user("Q")}, "missing_answer"),
    ({"final_answer": "1"}, "missing_prompt"),
    ({"prompt": "Q as a string", "final_answer": "1"}, "bad_prompt"),
    ({"prompt": [], "final_answer": "1"}, "empty_prompt"),
    ({"prompt": _user("   "), "final_answer": "1"}, "empty_prompt"),
    ({"prompt": [{"content": "Q"}], "final_answer": "1"}, "bad_prompt"),
    ({"prompt": [{"role": "user", "content": 5}], "final_answer": "1"}, "bad_prompt"),
    ({"prompt": ["Q"], "final_answer": "1"}, "bad_prompt"),
    ({"problem": ["Q"], "answer": "1"}, "bad_prompt"),
    ({"prompt": _user("Q"), "final_answer": ["1"]}, "bad_answer"),
    ({"prompt": _user("Q"), "final_answer": True}, "bad_answer"),
    ({"prompt": _user("Q"), "final_answer": None}, "missing_answer"),  # None = absent (parquet)
    ({"prompt": _user("Q"), "reward_model": {"ground_truth": None}}, "bad_answer"),
    ({"prompt": _user("Q"), "final_answer": " "}, "empty_answer"),
    ({"prompt": _user("Q"), "reward_model": "18"}, "bad_answer"),
    (["not", "an", "object"], "bad_row"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS)
def test_malformed_row_raises_with_file_and_row(tmp_path, bad, reason):
    path = _write_json(tmp_path / "rows.json", [{"prompt": _user("ok"), "final_answer": "1"}, bad])
    with pytest.raises(DataError) as err:
        load_problems(path)
    assert str(err.value).startswith(f"{path}: row 1: ")
    assert err.value.reason == reason


def test_malformed_jsonl_row_names_row_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    good, bad = json.dumps({"problem": "Q", "answer": "1"}), json.dumps({"problem": "Q"})
    path.write_text(f"\n{good}\n{bad}\n")
    with pytest.raises(DataError, match=r"rows\.jsonl: row 1 \(line 3\): no 'final_answer'"):
        load_problems(path)


def test_skip_counts_malformed_rows_by_reason(tmp_path):
    good = {"prompt": _user("ok"), "final_answer": "1"}
    rows = [good] + [bad for bad, _ in BAD_ROWS] + [good]
    report = load_problems(_write_json(tmp_path / "rows.json", rows), on_error="skip")
    assert [p.row for p in report.problems] == [0, len(rows) - 1]  # rows keep their file index
    assert report.skipped == len(BAD_ROWS)
    expected: dict[str, int] = {}
    for _, reason in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.reasons) == expected


def test_parquet_mixing_row_layouts(tmp_path):
    """Parquet fills the columns a row lacks with None; those count as absent, not as malformed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({
        "prompt": [_user("A"), None], "final_answer": ["1", None],
        "problem": [None, "B"], "answer": [None, "2"], "data_source": [None, "x"],
    }), path)
    problems = load_problems(path).problems
    assert [(p.prompt, p.answer, p.source) for p in problems] == [
        (_user("A" + SUFFIX), "1", "mixed"), (_user("B" + SUFFIX), "2", "x"),
    ]


def test_skip_applies_to_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"prompt": [_user("A"), []], "reward_model": [{"ground_truth": "1"}] * 2}), path)
    with pytest.raises(DataError, match=r"mixed\.parquet: row 1: 'prompt' is an empty list"):
        load_problems(path)
    report = load_problems(path, on_error="skip")
    assert [p.answer for p in report.problems] == ["1"] and dict(report.reasons) == {"empty_prompt": 1}


def test_dispatcher_errors(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported format '.csv'"):
        load_problems(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="on_error"):
        load_problems(BENCHMARKS / "aime2024.json", on_error="ignore")


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from soft_rl.tiny import build_tokenizer

    corpus = ["what is two plus two" + SUFFIX, "a much longer question about numbers 12345"] * 20
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300, corpus=corpus)


def test_render_prompt_uses_the_chat_template_with_generation_prompt(tokenizer):
    ids = render_prompt(tokenizer, _user("what is 2+2?"))
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    expected = "<|im_start|>user\nwhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert tokenizer.decode(ids) == expected


def test_filter_overlong_keeps_prompts_up_to_the_limit(tokenizer):
    def problem(text: str, row: int) -> Problem:
        return Problem(prompt=_user(text), answer="1", source="t", row=row, file="f")

    short, long = problem("two plus two", 0), problem("a much longer question " * 20, 1)
    limit = len(render_prompt(tokenizer, short.prompt))
    assert filter_overlong([short, long], tokenizer, limit) == ([short], 1)
    assert filter_overlong([short, long], tokenizer, limit - 1) == ([], 2)
