"""Where did it come from? `python -m tasks.lineage PATH_OR_VERSION... [--downstream PATH_OR_VERSION] [--json]`

For each output named (a predictions.csv, an export folder, a report.html, a shard, a
metrics.json, a run folder, or a version id), prints the chain of versions that made it, back to
the download: the source URL (redacted) and its sha256, each stage's parameters, the shards'
checksums, the model file's sha256, Train's code fingerprint and final step, the evaluation's
metrics and the blessing verdict. `--downstream` lists every version made from the one it names.
Reads the index (rebuilt first if missing or damaged) and the markers only; never TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.errors import PipelineError
from pipeline.lineage import lineage, made_from, render_downstream, render_lineage
from tasks.base import load_index
from tasks.console import printable

# Reads what was made; makes nothing (see pipeline.fingerprint).
AFFECTS_RESULTS = False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.lineage", description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="*", metavar="PATH_OR_VERSION",
                        help="An output's path (any file or folder within it) or a version id (8 or more hex digits)")
    parser.add_argument("--downstream", metavar="PATH_OR_VERSION",
                        help="List every version made from this one, directly or not")
    parser.add_argument("--json", action="store_true", help="Print one JSON object, for scripts")
    args = parser.parse_args(argv)
    if not args.outputs and args.downstream is None:
        parser.error("give an output's path or a version id, or --downstream PATH_OR_VERSION")
    try:
        index = load_index()
        found = {"lineage": [lineage(index, output) for output in args.outputs],
                 "downstream": made_from(index, args.downstream) if args.downstream is not None else None}
    except PipelineError as error:
        print(printable(f"error: {error}"), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(found, indent=2, sort_keys=True))
    else:
        shown = [*map(render_lineage, found["lineage"]),
                 *([render_downstream(found["downstream"])] if found["downstream"] else [])]
        print(printable("\n\n".join(shown)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
