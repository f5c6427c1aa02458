"""Math problems from disk: one ``Problem`` type whatever the file format.

Formats (``load_problems`` picks one by suffix, or a directory):
- ``.json``: a JSON array of rows, e.g. the benchmark files (``prompt`` chat list + ``final_answer``);
- ``.jsonl``: one JSON object per line, same fields, or ``problem``/``question`` text + ``answer``;
- ``.parquet``: the verl / DeepScaleR layout (``prompt`` messages, ``reward_model.ground_truth``,
  ``data_source``);
- a directory written by HuggingFace ``datasets`` ``save_to_disk``, with any of the row layouts above.

Chat messages are normalised to ``{"role", "content"}`` (ShareGPT ``{"from", "value"}`` and the roles
``human``/``gpt`` are accepted). The reference prompt template (§2.3 "Prompt format") appends
``" Let's think step by step and output the final answer within \\boxed{}."`` to the user message;
loaders append it to the last user message unless it is already there (verl parquets carry it), so
``Problem.prompt`` is ready for ``render_prompt``.

A malformed row raises ``DataError`` naming the file and the row, or with ``on_error="skip"`` is
dropped and counted by reason in the ``LoadReport``. A file that cannot be read at all (invalid JSON,
not parquet) always raises: skipping would hide a truncated or mislabelled file.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

INSTRUCTION = " Let's think step by step and output the final answer within \\boxed{}."
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: list[dict[str, str]]  # chat messages {"role", "content"}, the instruction included
    answer: str  # gold final answer, e.g. "18" or "\\frac{14}{3}"
    source: str  # data_source column, or the file's stem
    row: int  # 0-based index of the row in its file (JSONL: among non-blank lines)
    file: str


class DataError(ValueError):
    """A file or row that cannot be turned into a Problem; ``reason`` is a short machine-readable key."""

    def __init__(self, message: str, reason: str = "malformed_file"):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class LoadReport:
    problems: list[Problem]
    skipped: int = 0  # rows dropped with on_error="skip"
    reasons: Counter = dataclasses.field(default_factory=Counter)  # reason -> rows skipped


# --------------------------------------------------------------------------------------------------
# Prompt template and tokenisation
# --------------------------------------------------------------------------------------------------


def build_user_prompt(problem_text: str) -> str:
    """The reference user message: ``"{problem} Let's think step by step and output ... \\boxed{}."``."""
    return problem_text + INSTRUCTION


def render_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Prompt token ids: the tokenizer's chat template with the generation prompt appended."""
    ids = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids)


def filter_overlong(
    problems: Iterable[Problem], tokenizer, max_prompt_tokens: int
) -> tuple[list[Problem], int]:
    """Drop problems whose rendered prompt is longer than ``max_prompt_tokens`` (verl's
    ``filter_overlong_prompts``: keep iff ``len(ids) <= max``); returns (kept, number dropped)."""
    problems = list(problems)
    kept = [p for p in problems if len(render_prompt(tokenizer, p.prompt)) <= max_prompt_tokens]
    return kept, len(problems) - len(kept)


# --------------------------------------------------------------------------------------------------
# One row -> one Problem
# --------------------------------------------------------------------------------------------------

# A key whose value is None counts as absent: parquet and datasets give every row every column, so a
# file mixing layouts (``problem`` in some rows, ``prompt`` in others) has None in the unused ones.


def _first(d: dict, *keys: str) -> tuple[str | None, Any]:
    """(key, value) of the first of ``keys`` present in ``d`` with a non-None value, else (None, None)."""
    for key in keys:
        if d.get(key) is not None:
            return key, d[key]
    return None, None


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(f"'prompt' must be a list of chat messages, got {type(value).__name__}", "bad_prompt")
    if not value:
        raise DataError("'prompt' is an empty list", "empty_prompt")
    out = []
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"prompt message {k} is a {type(msg).__name__}, not an object", "bad_prompt")
        _, role = _first(msg, "role", "from")
        _, content = _first(msg, "content", "value")
        if role not in _ROLES or not isinstance(content, str):
            raise DataError(f"prompt message {k} needs a known role and string content, got {msg!r:.200}",
                            "bad_prompt")
        out.append({"role": _ROLES[role], "content": content})
    return out


def _prompt(row: dict) -> list[dict[str, str]]:
    key, value = _first(row, "prompt", "problem", "question")
    if key is None:
        raise DataError("no 'prompt', 'problem' or 'question' field", "missing_prompt")
    if key == "prompt":
        messages = _messages(value)
    elif isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    else:
        raise DataError(f"{key!r} must be a string, got {type(value).__name__}", "bad_prompt")
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise DataError("the prompt has no non-empty user message", "empty_prompt")
    return messages


def _answer(row: dict) -> str:
    # Precedence: final_answer (benchmarks) > reward_model.ground_truth (verl) > answer.
    key, value = _first(row, "final_answer", "reward_model", "answer")
    if key is None:
        raise DataError("no 'final_answer', 'reward_model.ground_truth' or 'answer' field", "missing_answer")
    if key == "reward_model":
        if not isinstance(value, dict) or value.get("ground_truth") is None:
            raise DataError("'reward_model' must be an object with a 'ground_truth'", "bad_answer")
        value = value["ground_truth"]
    # Numbers are accepted (JSON golds like 18) and kept as written; anything else is an error.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"the answer must be a string, got {type(value).__name__}", "bad_answer")
    if not value.strip():
        raise DataError("the answer is empty", "empty_answer")
    return value.strip()


def _with_instruction(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Append the reference instruction to the last user message unless it already ends with it."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    content = messages[last]["content"]
    if content.rstrip().endswith(INSTRUCTION.strip()):
        return messages
    return [*messages[:last], {"role": "user", "content": build_user_prompt(content)}, *messages[last + 1 :]]


def parse_row(
    row: Any, *, row_index: int, file: str, default_source: str, add_instruction: bool = True
) -> Problem:
    """One row (any supported layout) as a Problem; DataError without file/row context otherwise."""
    if not isinstance(row, dict):
        raise DataError(f"a row must be an object, got {type(row).__name__}", "bad_row")
    prompt = _prompt(row)
    answer = _answer(row)
    _, source = _first(row, "data_source", "source")
    if not isinstance(source, str) or not source:
        source = default_source
    if add_instruction:
        prompt = _with_instruction(prompt)
    return Problem(prompt=prompt, answer=answer, source=source, row=row_index, file=file)


# --------------------------------------------------------------------------------------------------
# Files -> rows
# --------------------------------------------------------------------------------------------------

# Each reader yields (row_index, where, row): ``where`` locates the row in error messages.
Rows = Iterator[tuple[int, str, Any]]


def _json_rows(path: Path) -> Rows:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise DataError(f"{path}: invalid JSON at {where}: {e.msg}", "bad_json") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}", "bad_json") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}", "bad_json")
    for i, row in enumerate(data):
        yield i, f"row {i}", row


def _jsonl_rows(path: Path) -> Rows:
    index = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: invalid JSON: {e.msg}", "bad_json") from e
            yield index, f"row {index} (line {lineno})", row
            index += 1


def _parquet_rows(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read parquet: {e}", "bad_file") from e
    for i, row in enumerate(rows):
        yield i, f"row {i}", row


def _hf_rows(path: Path, split: str | None) -> Rows:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a datasets directory (save_to_disk): {e}", "bad_file") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise DataError(f"{path}: pick a split with split=..., one of {sorted(ds)}", "bad_file")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield i, f"row {i}", row


def _rows(path: Path, split: str | None) -> Rows:
    if path.is_dir():
        return _hf_rows(path, split)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_rows(path)
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise DataError(f"{path}: unsupported format {suffix!r} (.json, .jsonl, .parquet or a datasets dir)")


def load_problems(
    path: str | Path,
    on_error: Literal["raise", "skip"] = "raise",
    *,
    split: str | None = None,
    add_instruction: bool = True,
) -> LoadReport:
    """All problems of one file or ``save_to_disk`` directory, in file order.

    ``on_error="raise"``: the first malformed row raises ``DataError("<file>: row <i>: <why>")``.
    ``on_error="skip"``: malformed rows are dropped and counted in ``LoadReport.skipped/.reasons``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    report = LoadReport(problems=[])
    default_source = path.stem if path.is_file() else path.name
    for index, where, row in _rows(path, split):
        try:
            problem = parse_row(row, row_index=index, file=str(path), default_source=default_source,
                                add_instruction=add_instruction)
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"{path}: {where}: {e}", e.reason) from None
            report.skipped += 1
            report.reasons[e.reason] += 1
            continue
        report.problems.append(problem)
    return report
