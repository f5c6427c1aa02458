"""User rewards for the reward tests, referenced as ``"tests.reward_helpers:<name>"``.

``misbehave`` reads its instructions from the response, so a single pool can be fed a good sample, a
sample whose reward raises, one that hangs and one that kills the scoring process.
"""

from __future__ import annotations

import os
import time

NOT_CALLABLE = 42


def exact(response: str, gold: str) -> float:
    return 1.0 if response == gold else 0.0


def misbehave(response: str, gold: str):
    if response == "raise":
        raise RuntimeError("deliberate failure in a user reward")
    if response == "hang":
        time.sleep(3600)
    if response == "exit":
        os._exit(3)
    if response == "alloc":
        return len(b"x" * (1536 * 2**20))  # 1.5 GB
    if response == "nan":
        return float("nan")
    if response == "text":
        return "not a number"
    return exact(response, gold)


def length_parity(response: str, gold: str) -> float:
    """1.0 for a response of even length: a stand-in reward that varies within GRPO groups, for smoke runs
    of models that rarely solve the task (an all-zero group has no advantage, hence no update)."""
    return float(len(response) % 2 == 0)
