"""Prompt-only prefix caching for soft_rl requests: a V1 ``Scheduler`` subclass (``scheduler_cls``).

vLLM hashes a KV block by its token ids, chained with the previous block's hash. For a soft_rl
request (``SamplingParams.extra_args["soft_rl"]`` holds a dict) that key describes only its prompt:
the KV of a generated position depends on the mixture the runner wrote into ``inputs_embeds``, and
every later position attends to it, but the hash sees only the emitted id. A GRPO group (n samples
of one prompt) often emits the same first ids with different mixtures, and a plain request can emit
the same ids too. So, with ``SoftEngine(prefix_caching="prompt")``:

* a soft_rl request caches only the blocks made entirely of prompt tokens: floor(P / block_size)
  blocks for a P-token prompt. The block holding the prompt's tail and the first generated tokens,
  and every later block, never enter the hash table;
* its cache lookup (on admission, and on resume after preemption, when vLLM looks up the prompt
  *and* the generated ids) can only hit those prompt blocks. A resumed soft request therefore never
  picks up a block that a plain request cached for the same ids; its generated positions are
  recomputed, and the runner restores their mixtures (``restored_positions``);
* plain requests are untouched: stock vLLM (every full block cached and looked up).

Prompt blocks are shared by every request, soft or plain: a prompt position's KV depends on the
prompt ids only (the runner only writes positions at or after the prompt's end).

The rule holds for every soft_rl request, including ``soft=False`` ones: their steps go through the
runner's ``inputs_embeds`` path too, and sharing generated blocks only pays off for identical
sampled continuations, which RL sampling rarely produces.

How: a request's block hashes are the only key of both the lookup (``find_longest_cache_hit``) and
the caching (``BlockPool.cache_full_blocks``). vLLM hashes the prompt's full blocks when it builds
the ``Request``; ``add_request`` then drops a soft_rl request's hasher, so no block holding a generated
token ever gets a hash and the lookup stops at the prompt. Caching must stop there too (the block
pool indexes the hash list by block number): the KV cache coordinator's ``cache_blocks``, the one
entry point of ``KVCacheManager.allocate_slots`` and the scheduler, is capped at the hashed prefix.
"""

from __future__ import annotations

from vllm.v1.core.kv_cache_coordinator import UnitaryKVCacheCoordinator
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec

EXTRA_KEY = "soft_rl"  # same as runner.EXTRA_KEY (not imported: the scheduler process needs no runner code)


def is_soft_rl(request) -> bool:
    sp = request.sampling_params
    extra = getattr(sp, "extra_args", None) if sp is not None else None
    return bool(extra) and isinstance(extra.get(EXTRA_KEY), dict)


class PromptOnlyCoordinator(UnitaryKVCacheCoordinator):
    """vLLM's single-group KV cache coordinator; a soft_rl request caches at most its hashed (prompt) blocks."""

    soft_capped_calls = 0

    def cache_blocks(self, request, num_computed_tokens: int) -> None:
        if is_soft_rl(request):
            # len(block_hashes) full prompt blocks were hashed before the hasher was dropped.
            hashed = len(request.block_hashes) * self.block_pool.hash_block_size
            if num_computed_tokens > hashed:
                self.soft_capped_calls += 1
                num_computed_tokens = hashed
        super().cache_blocks(request, num_computed_tokens)


class PromptCacheScheduler(Scheduler):
    """vLLM's V1 scheduler with prompt-only prefix caching for soft_rl requests (module docstring)."""

    # False: soft_rl requests keep their hasher, i.e. stock vLLM caching (tests use it to show the
    # wrong hits that the prompt-only rule prevents). Read when a request is added.
    prompt_only = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.soft_stats = {"soft_rl_requests": 0, "prompt_only_requests": 0}
        coord = self.kv_cache_manager.coordinator
        if not self.cache_config.enable_prefix_caching:
            return  # nothing is cached or looked up: stock behaviour
        groups = self.kv_cache_config.kv_cache_groups
        if (type(coord) is not UnitaryKVCacheCoordinator or len(groups) != 1
                or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec)
                or self.hash_block_size != self.block_size):
            raise ValueError("prompt-only prefix caching supports models with one full-attention KV cache "
                             f"group (got {type(coord).__name__}, {len(groups)} group(s)); "
                             "use SoftEngine(prefix_caching='off')")
        # The coordinator is built inside Scheduler.__init__ (no factory hook): swap this one instance's
        # class to a subclass that only adds the cap, as runner.py does with the model runner.
        coord.__class__ = PromptOnlyCoordinator

    def add_request(self, request) -> None:
        if request.request_id not in self.requests and is_soft_rl(request):
            self.soft_stats["soft_rl_requests"] += 1
            if self.prompt_only and self.cache_config.enable_prefix_caching:
                if not hasattr(request, "_block_hasher"):  # pinned by the 0.32.x version check, but be loud
                    raise RuntimeError("vllm.v1.request.Request has no _block_hasher: "
                                       "port workers/vllm_soft/scheduler.py")
                # The Request constructor hashed the prompt's full blocks; hash nothing more.
                request._block_hasher = None
                self.soft_stats["prompt_only_requests"] += 1
        super().add_request(request)

    def capped_cache_calls(self) -> int:
        """How often a soft_rl request asked to cache past its prompt blocks (and was refused)."""
        return int(getattr(self.kv_cache_manager.coordinator, "soft_capped_calls", 0))
