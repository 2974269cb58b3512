"""`jackpot config`: every configuration field of `jackpot train` with its value and docstring, and the
presets by name. With --config and/or overrides it shows the values they resolve to; --yaml prints the
resolved configuration as a YAML file that `jackpot train --config FILE` accepts.

Examples:
    jackpot config
    jackpot config --config tis-reverse-kl train.steps=50
    jackpot config --yaml > my.yaml && jackpot train --config my.yaml
"""

from __future__ import annotations

import argparse

import yaml

from jackpot.errors import rejected_input
from jackpot.train.config import (
    CACHE_ENV,
    RUNS_ENV,
    build_config,
    default_cache_dir,
    default_runs_dir,
    describe_fields,
    describe_presets,
    presets,
    to_dict,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help=f"a preset name ({', '.join(presets())}) or a YAML file")
    parser.add_argument("--yaml", action="store_true", help="print the resolved configuration as YAML")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")


def main(args: argparse.Namespace) -> int:
    with rejected_input():
        cfg = build_config(args.config, args.overrides)
    if args.yaml:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    source = " + ".join(filter(None, [f"preset/file {args.config}" if args.config else "",
                                      "overrides" if args.overrides else ""])) or "defaults"
    print(f"presets (jackpot train --config NAME):\n{describe_presets()}\n")
    print(f"config fields (section.field = value; {source}; set with section.field=value):\n{describe_fields(cfg)}\n")
    print(f"locations: pre-trained tiny models under cache_dir (${CACHE_ENV}/models, default "
          f"{default_cache_dir() / 'models'}); runs under ${RUNS_ENV} (default {default_runs_dir()})")
    return 0
