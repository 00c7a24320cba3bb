"""A small Dockerfile reader for the checks in test_dockerfile.py: instructions, COPY sources, .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined


def instructions(path: Path) -> list[Instruction]:
    """Logical instructions: comments dropped, backslash continuations joined."""
    result: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return result


def words(args: str) -> list[str]:
    """Exec form (JSON array) or shell form."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY/ADD from the build context, flags such as --chown dropped."""
    parts = [w for w in words(instruction.args) if not w.startswith("--")]
    return parts[:-1], parts[-1]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our file: the last pattern that matches the path or a parent folder wins."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, glob) or fnmatch.fnmatchcase(p, glob.removeprefix("**/")) for p in prefixes):
            ignored = not negated
    return ignored


def dockerignore_patterns(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]
