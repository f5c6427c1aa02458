"""The driver's data loading: data.max_prompt_tokens drops over-long prompts (chat template included)
and counts them, as verl's filter_overlong_prompts does."""

import json

import pytest

from soft_rl.config import load_config
from soft_rl.data import render_prompt


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_overlong_prompts_are_dropped_and_counted(tmp_path, tiny_dir, tiny_tokenizer):
    from soft_rl.data import load_problems
    from workers.driver import load_run_data

    rows = [{"prompt": [{"role": "user", "content": "1 + 1 ="}], "final_answer": "2"},
            {"prompt": [{"role": "user", "content": " ".join(["7 + 8"] * 40) + " ="}], "final_answer": "15"},
            {"prompt": [{"role": "user", "content": "3 + 4 ="}], "final_answer": "7"}]
    train = _write(tmp_path / "train.jsonl", rows)
    held = _write(tmp_path / "eval.jsonl", rows[1:])
    lengths = [len(render_prompt(tiny_tokenizer, p.prompt)) for p in load_problems(train).problems]
    limit = max(lengths[0], lengths[2])  # keeps the short prompts (<= limit), drops the long one
    assert lengths[1] > limit
    cfg = load_config("configs/tiny_cpu.yaml", [f"model.path={tiny_dir / 'qwen2'}", f"data.train_files=[{train}]",
                                                f"data.eval_files=[{held}]", f"data.max_prompt_tokens={limit}"])
    logs = []
    data = load_run_data(cfg, tiny_tokenizer, logs.append)
    assert [p.answer for p in data.train] == ["2", "7"] and [p.answer for p in data.eval] == ["7"]
    assert data.counts == {"train/rows": 3, "train/skipped_malformed": 0, "train/dropped_overlong": 1,
                           "eval/rows": 2, "eval/skipped_malformed": 0, "eval/dropped_overlong": 1}
    assert any("dropped 1 of 3 train prompts" in m and f"data.max_prompt_tokens={limit}" in m for m in logs)
    # a limit that drops everything is a configuration error naming the key
    cfg.data.max_prompt_tokens = 1
    with pytest.raises(ValueError, match="data.max_prompt_tokens"):
        load_run_data(cfg, tiny_tokenizer, logs.append)
