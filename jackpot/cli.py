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
    "eval": ("jackpot.eval_cli", "Mean@k and Pass@k of a model on a task, with every completion written out"),
    "plot": ("jackpot.plot", "overlay the metrics of one or more run directories into a PNG"),
    "config": ("jackpot.train.show_config", "list every config field of `jackpot train` (default, docstring) "
                                            "and the presets"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (so `jackpot --help` and each subcommand load
    just what they use, and one subcommand's import error cannot break the others)."""
    parser = argparse.ArgumentParser(prog="jackpot", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: JACKPOT_TRACEBACK=1); may appear anywhere")
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
    """Run a command; raises what it raises (`run` is the console entry point that reports errors)."""
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


def run(argv: list[str] | None = None) -> None:
    """Console entry point: an expected failure (bad input, missing or broken files, an unreachable hub, a
    full disk, ...) ends with one line `jackpot: error: ...` and exit status 2 instead of a traceback;
    `JACKPOT_TRACEBACK=1` or `--debug` shows the traceback. Unexpected exceptions (bugs) keep theirs."""
    import os
    import warnings

    from jackpot.errors import JackpotWarning, describe

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("JACKPOT_TRACEBACK", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]

    default_showwarning = warnings.showwarning

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, JackpotWarning):
            return default_showwarning(message, category, filename, lineno, file, line)
        print(f"jackpot: warning: {message}", file=sys.stderr)

    if not debug:
        warnings.showwarning = one_line_warning
        warnings.simplefilter("always", JackpotWarning)
    try:
        code = main(argv)
    except BrokenPipeError:  # `jackpot config | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except Exception as e:
        message = describe(e)
        if debug or message is None:
            raise
        print(f"jackpot: error: {message}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    run()
