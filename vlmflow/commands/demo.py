"""`vlmflow demo`: the main job on the local stack, ending with one JSON summary line."""

from __future__ import annotations

import argparse
import sys

from schemas.settings import Settings


def register(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "demo", help="local stack + tiny model + worker; submit good and bad image jobs; print results and a summary"
    )
    parser.add_argument("--jobs", type=int, default=40, help="jobs to submit (default 40)")
    parser.add_argument("--bad", type=int, default=13, help="of which bad on purpose (default 13: each kind once)")
    parser.add_argument("--engine", choices=["vllm", "instant"], default="vllm", help="default vllm (tiny model)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all results")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images and job mix")
    parser.add_argument("--max-output-tokens", type=int, default=64, help="per job (default 64)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from vlmflow.demo import run_demo

    if not 0 <= args.bad <= args.jobs:
        from schemas.errors import VlmflowError

        raise VlmflowError(f"--bad {args.bad} must be between 0 and --jobs {args.jobs}")
    summary = run_demo(
        settings,
        jobs=args.jobs,
        bad=args.bad,
        engine=args.engine,
        timeout_s=args.timeout,
        seed=args.seed,
        max_output_tokens=args.max_output_tokens,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(summary.json_line(), flush=True)
    return 0 if summary.lost == 0 else 1
