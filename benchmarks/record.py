"""Benchmark records: what a benchmark run measured, written as ``benchmarks/results/NAME.json``.

A record is one JSON object with these keys:

- ``name``: the record's name, the file's stem (and the ``NAME`` of the README's result markers);
- ``command``: the command line that produced it, ``python <script relative to the repo> <args>``;
- ``git_revision``: ``{"commit": <git rev-parse HEAD>, "dirty": <uncommitted changes outside
  benchmarks/results/>}`` (``commit`` is null outside a git checkout);
- ``machine``: architecture, processor, CPU count, torch threads, torch and Python versions and the
  CUDA device (null when none); never the host name;
- ``date``: when the record was written, UTC, ISO 8601;
- ``figures``: the measured values, as the script names them (NaN and infinities become null);
- ``table`` (optional): ``{"columns": [...], "rows": [[...], ...], "caption": "..."}``, the table
  that ``benchmarks/render.py`` puts between the ``<!-- results:NAME -->`` markers.

Benchmarks import it as ``from record import write_record`` (they run as ``python benchmarks/X.py``,
so this folder is first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def add_record_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--record NAME``: the record's name (``default``, the script's stem; ``''``: write none)."""
    parser.add_argument("--record", default=default, metavar="NAME",
                        help="write the figures to benchmarks/results/NAME.json (default %(default)s; '': none); "
                             "name runs that are not the headline differently, e.g. a held-out fold")


def command_line(args: Sequence[str] | None = None) -> str:
    """``python <script> <args>``: the running script relative to the repo (as given if outside it)
    and ``args`` (default ``sys.argv[1:]``), each shell-quoted."""
    shown = sys.argv[0]
    if shown not in ("", "-", "-c"):  # not a script: stdin or python -c
        try:
            shown = Path(shown).resolve().relative_to(REPO).as_posix()
        except ValueError:
            pass
    return " ".join(shlex.quote(a) for a in ["python", shown, *(sys.argv[1:] if args is None else args)])


def git_revision(repo: Path = REPO) -> dict:
    """``{"commit": HEAD or None, "dirty": bool or None}``; records themselves do not count as changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"],
                                cwd=repo, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def machine() -> dict:
    """What the figures ran on: architecture, CPUs, torch threads and versions, the CUDA device."""
    import torch

    return {
        "system": platform.system(),
        "arch": platform.machine(),
        "processor": platform.processor() or None,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def json_safe(value, where: str = "figures"):
    """``value`` with NaN/inf as None, numpy/torch scalars and arrays as Python numbers and lists,
    tuples as lists, paths as strings; anything else that JSON cannot hold is a TypeError naming it."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy and torch: scalars give numbers, arrays nested lists
        return json_safe(value.tolist(), where)
    raise TypeError(f"{where}: {type(value).__name__} is not JSON data")


def dumps(value, depth: int = 0) -> str:
    """JSON text, one key a line, a list of plain values (a table row) on one line."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + dumps(v, depth + 1) for v in value) + f"\n{pad}]"
    return json.dumps(value, allow_nan=False)


def check_table(table: Mapping, name: str) -> dict:
    """The ``table`` entry, checked: string columns, every row as long as the columns."""
    columns, rows = list(table.get("columns", [])), [list(r) for r in table.get("rows", [])]
    if not columns or not all(isinstance(c, str) for c in columns):
        raise ValueError(f"record {name}: table columns must be a non-empty list of strings, got {columns!r}")
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"record {name}: table row {i} has {len(row)} cells for {len(columns)} columns")
    return {"columns": columns, "rows": json_safe(rows, f"{name}.table"), "caption": str(table.get("caption", ""))}


def write_record(name: str, figures: dict, *, args: Sequence[str] | None = None, out_dir: Path | None = None,
                 table: Mapping | None = None) -> Path:
    """Write the record ``name`` (see the module docstring) to ``out_dir/NAME.json`` (default
    ``benchmarks/results/``) atomically, replacing an older one; ``args`` are the command's
    arguments when they are not ``sys.argv[1:]``. Returns the file's path."""
    if not NAME.fullmatch(name):
        raise ValueError(f"record name {name!r}: use letters, digits, '_', '.', '-' (it names a file and a marker)")
    record = {
        "name": name,
        "command": command_line(args),
        "git_revision": git_revision(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "figures": json_safe(figures),
    }
    if table is not None:
        record["table"] = check_table(table, name)
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(record) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the record from other readers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"record: {path}", file=sys.stderr)
    return path
