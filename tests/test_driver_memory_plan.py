"""`soft-rl train` on GPUs checks the memory plan before any actor starts (workers/driver.py check_memory_plan):
it writes the plan beside the run and stops, naming the keys to change, when a GPU would overflow."""

from __future__ import annotations

import pytest

from soft_rl.config import load_config

SHAPES = "configs/shapes/r1-distill-qwen-7b"


def _cfg(tmp_path, *more):
    return load_config("configs/softgrpo_r1_distill_qwen_7b.yaml",
                       [f"model.path={SHAPES}", f"trainer.out_dir={tmp_path}", *more])


def test_a_preset_that_fits_is_logged_and_its_plan_written(tmp_path, monkeypatch):
    import workers.driver as driver

    monkeypatch.setattr(driver, "gpu_memory_bytes", lambda timeout_s=120.0: 80 * 2**30)
    said: list[str] = []
    driver.check_memory_plan(_cfg(tmp_path), log=said.append)
    assert any("memory plan for 80 GiB GPUs: fits" in s for s in said)
    assert "learner rank" in (tmp_path / "memory_plan.txt").read_text()


def test_an_overflow_stops_the_run_naming_the_keys(tmp_path, monkeypatch):
    import workers.driver as driver

    monkeypatch.setattr(driver, "gpu_memory_bytes", lambda timeout_s=120.0: 80 * 2**30)
    cfg = _cfg(tmp_path, "learner.gradient_checkpointing=false", "learner.micro_batch_seqs=4",
               "learner.micro_batch_tokens=40960")
    with pytest.raises(driver.MemoryPlanError, match="learner.gradient_checkpointing") as e:
        driver.check_memory_plan(cfg, log=lambda s: None)
    assert "memory_plan.txt" in str(e.value) and (tmp_path / "memory_plan.txt").is_file()


def test_no_gpu_answering_is_a_warning_not_a_stop(tmp_path, monkeypatch):
    import workers.driver as driver

    monkeypatch.setattr(driver, "gpu_memory_bytes", lambda timeout_s=120.0: None)
    said: list[str] = []
    driver.check_memory_plan(_cfg(tmp_path), log=said.append)
    assert any("not checked" in s for s in said)
