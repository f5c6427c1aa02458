"""The embedded default task: multi-digit addition with a digit-by-digit chain of thought.

``task`` generates problems and gold responses, ``model`` builds the tokenizer and the tiny Qwen2,
``warmstart`` trains it by teacher forcing, ``init`` is ``soft-rl toy-init`` (cached by argument hash).
"""

from soft_rl.toy.init import toy_init
from soft_rl.toy.task import ToyProblem, ToyTaskConfig, make_splits

__all__ = ["ToyProblem", "ToyTaskConfig", "make_splits", "toy_init"]
