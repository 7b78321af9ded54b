"""Several queries for one `attribute` run: a JSON-lines file, one query per line.

    {"query": "bus.png", "prompt": "a red bus"}
    {"generate_seed": 3, "prompt": "a red bus", "name": "bus-seed-3"}

A query is an image file (relative paths are read from the list's folder) or a seed to generate it
from its prompt. Each result goes to a folder of its own under ``--out``, named by ``name`` (default:
the image file's stem, or ``seed-N``). The whole list is checked before any long stage runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .attribution.io import json_line

KEYS = ("query", "generate_seed", "prompt", "name")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class QuerySpec:
    """One query of a list: its image file or generation seed, its prompt, and its result folder's name."""
    name: str
    prompt: str
    query: Path | None = None
    generate_seed: int | None = None
    line: int = 0  # its line in the list (0: given on the command line)


def read_queries(path: str | Path) -> list[QuerySpec]:
    """The queries a list names, checked line by line (a ValueError names the line and the fix)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except OSError as exc:
        raise ValueError(f"--queries: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--queries: {str(path)!r} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    specs: list[QuerySpec] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            spec = _spec(line, lineno, path.parent)
            if spec.name in seen:
                raise ValueError(f"--queries: line {lineno} has the name {spec.name!r} of line {seen[spec.name]}; "
                                 "give each query its own \"name\" (its result folder)")
            seen[spec.name] = lineno
            specs.append(spec)
    if not specs:
        raise ValueError(f"--queries: {str(path)!r} lists no query; write one JSON object per line, like "
                         '{"query": "bus.png", "prompt": "a red bus"}')
    return specs


def _spec(line: str, lineno: int, folder: Path) -> QuerySpec:
    where = f"--queries: line {lineno}"
    rec = json_line(line, where, '{"query": "bus.png", "prompt": "a red bus"}')
    unknown = sorted(set(rec) - set(KEYS))
    if unknown:
        raise ValueError(f"{where} has {', '.join(map(repr, unknown))}; the keys are {', '.join(KEYS)}")
    prompt = rec.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{where}: \"prompt\" is a {type(prompt).__name__}; give the words the picture was made from "
                         "as one string")
    if prompt is None or not prompt.strip():
        raise ValueError(f"{where} has no \"prompt\"; give the words the picture was made from")
    query, seed = rec.get("query"), rec.get("generate_seed")
    if (query is None) == (seed is None):
        raise ValueError(f"{where}: give exactly one of \"query\" (an image file) and \"generate_seed\"")
    if query is not None:
        if not isinstance(query, str) or not query:
            raise ValueError(f"{where}: \"query\" must be an image file's path")
        file = (Path(query) if Path(query).is_absolute() else folder / query).resolve()  # recorded absolute
        if not file.is_file():
            raise ValueError(f"{where}: the query {str(file)!r} is not a file")
        # A stem such as "my query" made a folder name: its other characters become "_".
        default = re.sub(r"[^A-Za-z0-9._-]", "_", file.stem).lstrip("._-") or "query"
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"{where}: \"generate_seed\" {seed!r} must be an int in [0, 2**64)")
        file, default = None, f"seed-{seed}"
    name = rec.get("name", default)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: the name {name!r} cannot be a folder name; give \"name\" of letters, digits, "
                         "'.', '_' or '-'")
    return QuerySpec(name=name, prompt=prompt, query=file, generate_seed=seed, line=lineno)
