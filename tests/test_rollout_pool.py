"""RolloutPool: two Ray actors, each with a soft-thinking vLLM engine (slow: ~30-60 s on 2 cores)."""

from __future__ import annotations

import pytest

from soft_rl.reference import generate
from soft_rl.sampling import SoftSamplingParams

ARCH = dict(hidden=128, heads=2, kv_heads=1, layers=2)


@pytest.mark.slow
def test_pool_generates_in_order_and_syncs_weights(tmp_path, ray_cluster):
    from soft_rl.tiny import build_model, build_tokenizer
    from workers.rollout import RolloutPool, RolloutRequest

    tok = build_tokenizer(tmp_path / "tok")
    model = build_model(tmp_path / "m", tok, arch="qwen2", seed=21, **ARCH).eval()
    new = build_model(tmp_path / "m2", tok, arch="qwen2", seed=22, **ARCH).eval()
    prompts = []
    for i in range(5):
        p = tok.apply_chat_template([{"role": "user", "content": f"{i} * {i + 2} = ?"}], add_generation_prompt=True)
        prompts.append(list(p if isinstance(p, list) else p["input_ids"]))
    params = [SoftSamplingParams(seed=i, top_k=6, k=4, tau=0.5, thinking_budget=8 if i % 2 else None)
              for i in range(5)]
    requests = [RolloutRequest(p, s, 16) for p, s in zip(prompts, params, strict=True)]

    def ref(m):
        return generate(m, prompts, params, max_new_tokens=16, eos_token_ids=[tok.eos_token_id], tokenizer=tok,
                        width=8)

    pool = None
    try:
        pool = RolloutPool(2, str(tmp_path / "m"), dict(dtype="float32", enforce_eager=True, max_model_len=128,
                                                         max_k=8, max_new_tokens=32),
                           env={"OMP_NUM_THREADS": "1"})
        health = pool.health()
        assert len(health) == 2 and all(h["ok"] for h in health) and health[0]["pid"] != health[1]["pid"]
        got = pool.generate(requests)
        assert [t.tokens.tolist() for t in got] == [t.tokens.tolist() for t in ref(model)]
        assert [t.prompt_ids.tolist() for t in got] == prompts
        assert pool.update_weights(new.state_dict()) == [len(new.state_dict())] * 2
        pool.reset_prefix_cache()
        got = pool.generate(requests)
        assert [t.tokens.tolist() for t in got] == [t.tokens.tolist() for t in ref(new)]
        assert sum(h["generated"] for h in pool.health()) == 10
    finally:
        if pool is not None:
            pool.shutdown()
