"""Command line (``chlib`` once installed, or ``python -m chlib``): ``chlib run NOTEBOOK... --run
NAME -p KEY VALUE ...`` runs notebooks headless; ``chlib params NOTEBOOK`` lists a notebook's
parameters."""

from __future__ import annotations

import argparse
import sys

from chlib.core.errors import ChlibError
from chlib.ui import runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute numbered notebooks headless with papermill")
    run.add_argument("notebooks", nargs="+", help="e.g. 01_prepare 02_extract (or 01 02)")
    run.add_argument("--run", required=True, help="run name: outputs go to runs/<name>/notebooks/")
    run.add_argument("--runs-root", default="runs")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                     metavar=("KEY", "VALUE"), help="a notebook parameter (repeatable): a literal or text")
    run.add_argument("--keep-going", action="store_true", help="run later notebooks after a failure")
    sub.add_parser("params", help="list the parameters a notebook declares").add_argument("notebook")
    args = parser.parse_args(argv)
    try:
        if args.command == "params":
            print("\n".join(runner.parameter_help(runner.notebook_path(args.notebook))))
            return 0
        record = runner.run_notebooks(
            args.notebooks, run=args.run, runs_root=args.runs_root,
            parameters={k: runner.parse_cli_value(v) for k, v in args.parameter},
            stop_on_error=not args.keep_going)
    except ChlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(record.summary())
    return 0 if record.ok else 1


if __name__ == "__main__":
    sys.exit(main())
