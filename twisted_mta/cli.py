"""
The operator's command line: C{twisted-mta config check|show FILE}.

Exit status 0 on success, 1 when the configuration is bad (the reason on
stderr, one line), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted_mta.config import ConfigError, load_config
from twisted_mta.tlsserver import TLSSetupError, server_context


def _flatten(prefix: str, value: Any, out: list[str]) -> None:
    if isinstance(value, dict) and prefix != "local.aliases" or prefix == "":
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    elif prefix == "listeners":
        for i, item in enumerate(value):
            for k, v in item.items():
                out.append(f"listeners[{i}].{k} = {json.dumps(v)}")
    else:
        out.append(f"{prefix} = {json.dumps(value)}")


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        server_context(config.tls)
    except (ConfigError, TLSSetupError) as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(config.listeners)} listener(s), "
          f"{len(config.local.domains)} local domain(s))")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 1
    data = config.to_dict()
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        lines: list[str] = []
        _flatten("", data, lines)
        print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twisted-mta", description="twisted-mta operator tools")
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="check or show a configuration file")
    config_sub = config.add_subparsers(dest="action", required=True)
    check = config_sub.add_parser("check", help="validate FILE; exit non-zero with the reason")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    show = config_sub.add_parser("show", help="print the effective configuration")
    show.add_argument("file")
    show.add_argument("--json", action="store_true", help="print JSON instead of key = value")
    show.set_defaults(func=cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
