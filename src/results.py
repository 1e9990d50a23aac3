"""`python -m src.results [DIR...]`: the results table of every run found, then its statistics.

Finds every `results.jsonl` under the given folders (default: outputs/ and multirun/) and prints one row per
kind x recipe with mean +- std over seeds (`src.analysis.table`), as markdown or CSV, then the groups' 95%
intervals and paired differences (`src.analysis.statistics`); `--rank-figure` draws accuracy against tunable
parameters per rank (`src.analysis.figures`).
"""

from __future__ import annotations

import argparse
import sys

from src.analysis import figures, statistics
from src.analysis.table import KINDS, SHOWN_KINDS, format_table, load_runs
from src.errors import reported_errors


def main(argv: list[str] | None = None) -> int:
    """Print the results found under the given folders: the table, then (as markdown) its statistics."""
    parser = argparse.ArgumentParser(prog="python -m src.results", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="*", default=["outputs", "multirun"], help="folders or results.jsonl files")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--include", action="append", default=[], choices=KINDS,
                        help="also show this kind of run (debug runs are left out by default)")
    statistics.add_arguments(parser)
    figures.add_arguments(parser)
    args = parser.parse_args(argv)
    with reported_errors():
        runs, entries, text = load_runs(args.dirs, tuple(dict.fromkeys([*SHOWN_KINDS, *args.include])))
        print(text, file=sys.stderr)
        if not args.stats:
            print(format_table(entries, args.format))
        stats = statistics.Statistics(entries, runs, args.replicates)
        statistics.print_statistics(stats, args)
        figures.write_rank_figure(stats, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
