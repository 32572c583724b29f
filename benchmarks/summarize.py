"""Regenerate the "Latest results" section of ``benchmarks/README.md`` from ``results/*.json``.

Each results file carries its own command, machine and Markdown table (see ``common.write_results``),
so the summary is only a concatenation in name order, written between the README's
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers (atomically).

    python benchmarks/summarize.py             # rewrite the README section
    python benchmarks/summarize.py --stdout    # print it instead
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# benchmarks/ is on sys.path (it is this script's folder); common also puts the working tree's src/ there.
from common import BENCH_DIR, DEFAULT_RESULTS_DIR, machine_line

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
_EMPTY = "_No results yet: run the commands above, then `python benchmarks/summarize.py`._"


def load_results(results_dir: Path) -> list[dict]:
    """Every ``<name>.json`` written by ``write_results`` (others are skipped with a note on stderr)."""
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            sys.stderr.write(f"{path}: skipped ({err})\n")
            continue
        if not isinstance(doc, dict) or not {"name", "command", "machine", "table_md"} <= doc.keys():
            sys.stderr.write(f"{path}: skipped (not a benchmark results file)\n")
            continue
        docs.append(doc)
    return docs


def render(docs: list[dict]) -> str:
    if not docs:
        return _EMPTY
    parts = []
    for doc in docs:
        table = re.sub(r"\]\(([^/():]+\.png)\)", r"](results/\1)", doc["table_md"].rstrip())  # figures beside the JSON
        parts.append(f"### {doc['name']}\n\n{doc.get('created_utc', '?')} · `{doc['command']}`\n\n"
                     f"Machine: {machine_line(doc['machine'])}\n\n{table}")
    return "\n\n".join(parts)


def replace_section(text: str, body: str) -> str:
    """``text`` with everything between the markers replaced by ``body``."""
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"the README has no '{BEGIN}' ... '{END}' section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    p.add_argument("--readme", type=Path, default=BENCH_DIR / "README.md")
    p.add_argument("--stdout", action="store_true", help="print the section instead of rewriting the README")
    args = p.parse_args(argv)
    body = render(load_results(args.results_dir))
    if args.stdout:
        sys.stdout.write(body + "\n")
        return 0
    from pneumoscope.utils.io import atomic_write_text

    atomic_write_text(args.readme, replace_section(args.readme.read_text(), body))
    sys.stdout.write(f"updated {args.readme} ({body.count('### ')} result(s))\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
