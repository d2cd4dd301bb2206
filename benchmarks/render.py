"""Render the benchmark records (``benchmarks/results/*.json``) into README.md and docs/*.md.

    python benchmarks/render.py          # rewrite the marked blocks
    python benchmarks/render.py --check  # exit 1 naming every stale block, 0 when all are current

In those files, a block between the lines ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
is replaced by record NAME's ``table`` as Markdown (its caption above it; numbers to 3 decimals
unless integers) and one italic line naming the record's file, command, revision, date and machine.
Everything outside the markers is left alone. A marker whose record does not exist, a record
without a table, or a marker left open stops it with an error naming the file (exit 2).
Records are written by the benchmark scripts (``benchmarks/record.py``), never by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
START = re.compile(r"<!-- results:([A-Za-z0-9][A-Za-z0-9_.-]*) -->")
END = re.compile(r"<!-- /results:([A-Za-z0-9][A-Za-z0-9_.-]*) -->")


class RenderError(Exception):
    """A marker or record that cannot be rendered; the message names the file."""


def load_records(results: Path | None = None) -> dict[str, dict]:
    """Every ``results/*.json`` (default ``benchmarks/results/``) by name; a file that is not a
    record is an error naming it."""
    records = {}
    for path in sorted((results or RESULTS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RenderError(f"{path}: not a readable JSON record ({err})") from err
        if not isinstance(record, dict) or record.get("name") != path.stem:
            raise RenderError(f"{path}: a record whose 'name' is its file's stem ({path.stem!r}) was expected")
        records[path.stem] = record
    return records


def cell(value) -> str:
    """A table cell: integers as they are, other numbers to 3 decimals, None as '–'."""
    if value is None:
        return "–"
    if isinstance(value, int):  # bool too
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def machine_summary(m: dict) -> str:
    """``x86_64, 2 CPUs, torch 2.5.1 with 2 threads, no GPU`` from a record's ``machine``."""
    gpu = f"CUDA {m['cuda_device']}" if m.get("cuda_device") else "no GPU"
    return f"{m.get('arch')}, {m.get('cpus')} CPUs, torch {m.get('torch')} with {m.get('torch_threads')} threads, {gpu}"


def render_block(record: dict, where: str) -> list[str]:
    """The lines that go between record's markers: caption, table, provenance line."""
    table = record.get("table")
    if not table:
        raise RenderError(f"{where}: record {record['name']} has no table to render")
    lines = [f"{table['caption']}", ""] if table.get("caption") else []
    lines.append("| " + " | ".join(cell(c) for c in table["columns"]) + " |")
    lines.append("|" + "---|" * len(table["columns"]))
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table["rows"]]
    rev = record.get("git_revision") or {}
    revision = (rev.get("commit") or "unknown")[:7] + ("-dirty" if rev.get("dirty") else "")
    command = record["command"]
    code = f"`` {command} ``" if "`" in command else f"`{command}`"
    date, summary = str(record.get("date", ""))[:10], machine_summary(record.get("machine") or {})
    lines += ["", f"*From benchmarks/results/{record['name']}.json: {code}, revision {revision}, {date}, {summary}.*"]
    return lines


def render_text(text: str, records: dict[str, dict], where: str) -> tuple[str, list[str]]:
    """``text`` with every marked block rendered, and the names of the blocks that changed."""
    out: list[str] = []
    changed: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if END.fullmatch(line.strip()):
            raise RenderError(f"{where}:{i}: {line.strip()} closes no open marker")
        start = START.fullmatch(line.strip())
        if not start:
            continue
        name = start.group(1)
        close = next((j for j in range(i, len(lines)) if START.fullmatch(lines[j].strip())
                      or END.fullmatch(lines[j].strip())), None)
        if close is None or lines[close].strip() != f"<!-- /results:{name} -->":
            raise RenderError(f"{where}:{i}: <!-- results:{name} --> is not closed by <!-- /results:{name} -->")
        if name not in records:
            raise RenderError(f"{where}:{i}: no record benchmarks/results/{name}.json for <!-- results:{name} -->")
        block = render_block(records[name], f"{where}:{i}")
        if lines[i:close] != block:
            changed.append(name)
        out += block
        out.append(lines[close])
        i = close + 1
    return "\n".join(out), changed


def documents(repo: Path | None = None) -> list[Path]:
    """README.md and docs/*.md (those that exist) of ``repo`` (default this checkout)."""
    repo = repo or REPO
    return [p for p in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))] if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = ap.parse_args(argv)
    try:
        records = load_records()
        stale = []
        for path in documents():
            text = path.read_text()
            new, changed = render_text(text, records, str(path.relative_to(REPO)))
            stale += [f"{path.relative_to(REPO)}: results:{name}" for name in changed]
            if new != text and not args.check:
                tmp = path.with_name(f".{path.name}.render.tmp")
                tmp.write_text(new)
                tmp.replace(path)
    except RenderError as err:
        print(f"render: {err}", file=sys.stderr)
        return 2
    for s in stale:
        print(("stale " if args.check else "rendered ") + s)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
