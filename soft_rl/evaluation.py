"""Evaluation: n samples per problem, scored, summarised as pass@1, pass@k and token lengths.

For a problem with n samples of which c are correct (reward >= 1, the rewards being binary):

    pass@1                = mean over problems of c / n
    unbiased pass@k       = mean over problems of 1 - C(n - c, k) / C(n, k)        (k = 1, 2, 4, ..., n)
    first-k pass@k        = mean over problems of [any of the first k samples is correct]   (the paper's)
    mean length           = mean generated tokens over all samples (EOS included), and over correct ones

First-k pass@k depends on the sample order, so samples keep their generation order: sample j of a
problem always has the seed ``sample_seed(seed, key, j)``, whatever the batching or backend.

This module is pure library code (``compute_metrics`` needs nothing but Python; ``generate_hf`` runs
the HF reference sampler). The driver with the vLLM rollout pool and the reward actors is
``workers/eval.py`` (``soft-rl eval``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from soft_rl.metrics import first_k_pass, pass_at_k, powers_of_two_upto
from soft_rl.noise_kinds import noise_kind
from soft_rl.noise_kinds.embedding_gaussian import EMBEDDING_NOISE, embedding_rms, sigma_from_rms
from soft_rl.sampling import SoftSamplingParams

# The paper's evaluation settings (SofT-GRPO §4.1): 32 samples, T = 1.0, top-k = K = 5, top-p 0.95,
# tau_g = 0.1, Gumbel noise, up to 32k generated tokens.
PAPER_PRESET = dict(n=32, temperature=1.0, top_k=5, top_p=0.95, min_p=0.0, k=5, tau=0.1, noise="gumbel",
                    max_new_tokens=32768)

# Model dtype and reward of ``soft-rl eval`` when the flags are not given. The paper preset follows the
# official standalone evaluation: bfloat16 weights, math-verify over the whole completion (``math_whole``);
# otherwise float32 and the last box (``math``, the training reward's judge).
EVAL_DEFAULTS = dict(dtype="float32", reward="math")
PAPER_EVAL_DEFAULTS = dict(dtype="bfloat16", reward="math_whole")


def resolve_eval_defaults(preset: str | None, *, dtype: str | None = None, reward: str | None = None) -> dict:
    """``{"dtype": ..., "reward": ...}``: the explicit values where given (not None), else the defaults of
    ``preset`` (``"paper"``: ``PAPER_EVAL_DEFAULTS``; None: ``EVAL_DEFAULTS``)."""
    if preset not in (None, "paper"):
        raise ValueError(f"unknown preset {preset!r}; known: 'paper'")
    defaults = PAPER_EVAL_DEFAULTS if preset == "paper" else EVAL_DEFAULTS
    given = {"dtype": dtype, "reward": reward}
    return {key: given[key] if given[key] is not None else value for key, value in defaults.items()}


@dataclass
class EvalSettings:
    mode: str = "soft"  # soft: soft thinking; discrete: ordinary token sampling in both phases
    n: int = 32
    temperature: float = 1.0
    top_k: int = 5
    top_p: float = 0.95
    min_p: float = 0.0
    k: int = 5
    tau: float = 0.1
    noise: str = "gumbel"
    max_new_tokens: int = 4096  # the paper preset: 32768
    think_end: str = "</think>"
    thinking_budget: int | None = None  # force think_end after this many thinking steps (models without it)
    seed: int = 0
    # noise=embedding_gaussian: sigma = embedding_noise x the RMS of the model's input embedding (embedding_rms;
    # None: read from the checkpoint by the evaluation run, ``checkpoint_embedding_rms``)
    embedding_noise: float = EMBEDDING_NOISE
    embedding_rms: float | None = None

    def __post_init__(self):
        if self.mode not in ("soft", "discrete"):
            raise ValueError(f"mode must be 'soft' or 'discrete', got {self.mode!r}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.params(0, validate_only=True)  # validates the sampling parameters

    @classmethod
    def paper(cls, **overrides) -> EvalSettings:
        return cls(**{**PAPER_PRESET, **overrides})

    @property
    def needs_embedding_rms(self) -> bool:
        return self.mode == "soft" and noise_kind(self.noise).noises_input

    def params(self, seed: int, validate_only: bool = False) -> SoftSamplingParams:
        sigma = 0.0
        if self.needs_embedding_rms:
            if not self.embedding_noise > 0:
                raise ValueError(f"embedding_noise must be > 0, got {self.embedding_noise}")
            if self.embedding_rms is None and not validate_only:
                raise ValueError(f"noise={self.noise!r} needs the model's embedding RMS (EvalSettings.embedding_rms)")
            sigma = sigma_from_rms(1.0 if self.embedding_rms is None else self.embedding_rms, self.embedding_noise)
        return SoftSamplingParams(soft=self.mode == "soft", temperature=self.temperature, top_k=self.top_k,
                                  top_p=self.top_p, min_p=self.min_p, k=self.k, tau=self.tau, noise=self.noise,
                                  embedding_sigma=sigma, think_end=self.think_end,
                                  thinking_budget=self.thinking_budget, seed=seed)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def checkpoint_embedding_rms(model_dir: str | Path) -> float:
    """The RMS of a Hugging Face checkpoint's input embedding, read from its safetensors files alone (no model is
    built): the tensor whose name ends with one of ``EMBEDDING_NAMES``."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name.endswith(EMBEDDING_NAMES):
                    return embedding_rms(st.get_tensor(name))
    raise ValueError(f"{model_dir}: no input embedding ({' / '.join(EMBEDDING_NAMES)}) in "
                     f"{len(files)} safetensors file(s); pass the RMS (EvalSettings.embedding_rms)")


def sample_seed(seed: int, key: str, j: int) -> int:
    """A 63-bit seed for sample ``j`` of the problem identified by ``key`` (e.g. "file:row")."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def ks_for(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself."""
    ks = powers_of_two_upto(n)
    return ks if ks[-1] == n else [*ks, n]


# --------------------------------------------------------------------------------------------------
# Metrics (pure)
# --------------------------------------------------------------------------------------------------


def compute_metrics(outcomes: Sequence[Sequence[bool]], lengths: Sequence[Sequence[int]]) -> dict:
    """Summary of one dataset from per-problem, per-sample outcomes and token lengths (generation order).

    Every problem must have the same number of samples n >= 1. Returns ``pass@1``, ``pass_at_k`` and
    ``first_k_pass_at_k`` ({k: value} for k in ``ks_for(n)``), ``mean_length``, ``mean_length_correct``
    (None when nothing is correct), ``num_problems``, ``n``, ``num_correct`` and ``correct_counts``.
    """
    if len(outcomes) != len(lengths):
        raise ValueError(f"{len(outcomes)} problems of outcomes but {len(lengths)} of lengths")
    if not outcomes:
        raise ValueError("no problems")
    n = len(outcomes[0])
    for i, (o, ln) in enumerate(zip(outcomes, lengths, strict=True)):
        if len(o) != n or len(ln) != n:
            raise ValueError(f"problem {i}: {len(o)} outcomes and {len(ln)} lengths, expected {n} of each")
    if n < 1:
        raise ValueError("every problem needs at least one sample")
    P = len(outcomes)
    counts = [sum(bool(x) for x in o) for o in outcomes]
    ks = ks_for(n)
    all_lengths = [x for ln in lengths for x in ln]
    correct_lengths = [x for o, ln in zip(outcomes, lengths, strict=True) for ok, x in zip(o, ln, strict=True) if ok]
    return {
        "num_problems": P,
        "n": n,
        "num_correct": sum(counts),
        "correct_counts": counts,
        "pass@1": sum(c / n for c in counts) / P,
        "pass_at_k": {k: sum(pass_at_k(n, c, k) for c in counts) / P for k in ks},
        "first_k_pass_at_k": {k: sum(first_k_pass([bool(x) for x in o], k) for o in outcomes) / P for k in ks},
        "mean_length": sum(all_lengths) / len(all_lengths),
        "mean_length_correct": sum(correct_lengths) / len(correct_lengths) if correct_lengths else None,
    }


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One generated response: its text (what the reward sees), token count and finish reason."""

    text: str
    num_tokens: int
    finish_reason: str


def response_text(tokenizer, token_ids: Sequence[int]) -> str:
    """Decoded response with the think markers kept and EOS / padding dropped."""
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return tokenizer.decode([t for t in token_ids if t not in drop], skip_special_tokens=False)


def to_sample(tokenizer, traj) -> Sample:
    """A ``soft_rl.trajectory.Trajectory`` as a Sample."""
    return Sample(response_text(tokenizer, traj.tokens.tolist()), traj.num_tokens, traj.finish_reason)


def sample_requests(keys: Sequence[str], settings: EvalSettings) -> list[tuple[int, int, SoftSamplingParams]]:
    """(problem index, sample index, params) for every sample, problem-major, in generation order."""
    return [(i, j, settings.params(sample_seed(settings.seed, key, j)))
            for i, key in enumerate(keys) for j in range(settings.n)]


def generate_hf(model, tokenizer, prompts: Sequence[Sequence[int]], keys: Sequence[str], settings: EvalSettings,
                *, batch_size: int = 64, progress: Callable[[int], None] | None = None) -> list[list[Sample]]:
    """n samples per prompt with the HF reference sampler (``soft_rl.reference.generate``), in batches.

    ``keys`` identify the problems for the per-sample seeds; ``progress(m)`` is called after each batch
    with the number of samples it generated. Returns samples[problem][j] in generation order.
    """
    from soft_rl.reference import generate

    if len(prompts) != len(keys):
        raise ValueError(f"{len(prompts)} prompts but {len(keys)} keys")
    eos = sorted({tokenizer.eos_token_id})
    requests = sample_requests(keys, settings)
    out: list[list[Sample | None]] = [[None] * settings.n for _ in prompts]
    for start in range(0, len(requests), batch_size):
        chunk = requests[start: start + batch_size]
        trajs = generate(model, [prompts[i] for i, _, _ in chunk], [p for _, _, p in chunk],
                         max_new_tokens=settings.max_new_tokens, eos_token_ids=eos, tokenizer=tokenizer)
        for (i, j, _), traj in zip(chunk, trajs, strict=True):
            out[i][j] = to_sample(tokenizer, traj)
        if progress is not None:
            progress(len(chunk))
    return out  # type: ignore[return-value]


def dataset_report(samples: Sequence[Sequence[Sample]], rewards: Sequence[Sequence[float]],
                   answers: Sequence[str], rows: Sequence[int]) -> dict:
    """The per-dataset JSON body: ``compute_metrics`` plus per-problem details and finish reasons."""
    outcomes = [[r >= 1.0 for r in rs] for rs in rewards]
    lengths = [[s.num_tokens for s in ss] for ss in samples]
    metrics = compute_metrics(outcomes, lengths)
    reasons: dict[str, int] = {}
    for ss in samples:
        for s in ss:
            reasons[s.finish_reason] = reasons.get(s.finish_reason, 0) + 1
    metrics["finish_reasons"] = reasons
    metrics["problems"] = [
        {"row": row, "answer": ans, "correct": sum(o), "outcomes": [int(x) for x in o],
         "lengths": ln, "rewards": list(rs)}
        for row, ans, o, ln, rs in zip(rows, answers, outcomes, lengths, rewards, strict=True)
    ]
    return metrics
