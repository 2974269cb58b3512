"""jackpot: RL post-training of a policy on rollouts from a different (smaller) model, corrected with
token-level Optimal Budgeted Rejection Sampling. `jackpot COMMAND --help` describes each command.

Each subcommand is a module exposing add_arguments(parser) and main(args)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). A module is imported only when its subcommand runs.
COMMANDS = {
    "simulate": ("jackpot.simulate", "reproduce the paper's numerical OBRS study (Figure 2) plus a budget sweep"),
    "pretrain": ("jackpot.train.pretrain", "warm-start a tiny model on a task by supervised fine-tuning"),
    "train": ("jackpot.train.cli", "RL-train a policy on rollouts from a (smaller) rollout model"),
    "eval": ("jackpot.eval", "Mean@k and Pass@k of a model on a task, with every completion written out"),
    "plot": ("jackpot.plot", "overlay the metrics of one or more run directories into a PNG"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (so `jackpot --help` and each subcommand load
    just what they use, and one subcommand's import error cannot break the others)."""
    parser = argparse.ArgumentParser(prog="jackpot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if a in COMMANDS), None))
    # overrides (section.field=value) may come before or after options: collect the stray ones
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args._module.main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console entry point: bad input ends with a one-line error naming the problem, not a traceback
    (set JACKPOT_TRACEBACK=1 to see it)."""
    import os

    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        if os.environ.get("JACKPOT_TRACEBACK"):
            raise
        print(f"jackpot: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
