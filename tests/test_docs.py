"""The README and docs as a reader meets them: every fit and atlas command composes as written,
and every results table is the one its benchmark record renders (never typed by hand)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mvmm_monai import compose_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRY = {"mvmm-fit": "fit", "scripts/fit.py": "fit", "mvmm-build-atlas": "build_atlas", "scripts/build_atlas.py": "build_atlas"}


def _commands() -> list[tuple[str, str, list[str]]]:
    """``(where, config name, overrides)`` of every fit / atlas command in a ``bash`` block."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split("#", 1)[0]) if line.strip() and not line.lstrip().startswith("#") else []
                for i, w in enumerate(words):
                    entry = next((name for key, name in ENTRY.items() if w.endswith(key)), None)
                    if entry:
                        found.append((f"{doc.name}: {line.strip()}", entry, [a for a in words[i + 1 :] if a not in ("-m", "--multirun")]))
                        break
    return found


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10 and {c[1] for c in COMMANDS} == {"fit", "build_atlas"}


@pytest.mark.parametrize("where, entry, overrides", COMMANDS, ids=[c[0][:60] for c in COMMANDS])
def test_every_documented_command_composes(where, entry, overrides, tmp_path):
    """Each command's overrides name existing keys and groups (what Hydra checks before a run)."""
    args = [a.replace("DIR", str(tmp_path)) for a in overrides]
    if entry == "fit" and not any(a.startswith("paths.output_dir=") for a in args):
        args.append(f"paths.output_dir={tmp_path / 'out'}")
    if entry == "fit":
        args = [a.split(",")[0] if "=" in a and "," in a and "[" not in a and "{" not in a else a for a in args]  # a sweep: its first value
    compose_config(args, config_name=entry)


def test_results_tables_are_rendered_from_the_records():
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render.py"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
