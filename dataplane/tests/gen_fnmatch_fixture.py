"""Writes tests/data/fnmatch.json: what Python's fnmatch answers (``fnmatch.translate``
matched with ``re.match``, the grpc.aio plane's rule for --idempotent globs), for the
Rust port's glob tests (src/retry/glob.rs).

Run from the repository root with the project's venv:
    .venv/bin/python dataplane/tests/gen_fnmatch_fixture.py
Patterns are drawn over the characters that steer fnmatch.translate ("[!]-^\\*?&|"
and a few letters); names are every string of up to 3 characters over a
similar alphabet, so each pattern's answer is exhaustive over that set.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import random
import re
import sys
from pathlib import Path


def matches(pattern: str, name: str) -> bool:
    return re.match(fnmatch.translate(pattern), name) is not None


PATTERN_ALPHABET = "abz-!]^[\\*?&|"
NAME_ALPHABET = "abz-!]^[\\&"
HANDPICKED = [
    "",
    "*",
    "**",
    "?",
    "a*b?c",
    "[",
    "[!",
    "[]",
    "[]]",
    "[!]]",
    "[!]a]",
    "[]-a]",
    "[z-a]",
    "[!z-a]",
    "[a--c]",
    "[z-a!b]",
    "[z-a^b]",
    "[z-a[b]",
    "[a-]",
    "[-a]",
    "[!-a]",
    "[a-c-e]",
    "[\\]",
    "[\\-a]",
    "[a-z]*",
    "[^a]",
    "[[]",
    "[&&]",
    "[a&&b]",
    "[~]",
    "[|]",
    "[!!]",
    "[a-b-c]",
    "[b-a-z]",
    "[!b-a-z]",
    "[--a]",
    "[a-a]",
    "[]-]",
    "[!]-]",
    "*[!a]*",
    "a[",
    "[a",
    "[!a",
    "*a*b*",
    "a**b",
    "?*?",
    "[*]",
    "[?]",
    "[!*]",
]


def main() -> None:
    rng = random.Random(20240611)
    patterns = list(HANDPICKED)
    seen = set(patterns)
    while len(patterns) < 700:
        p = "".join(rng.choice(PATTERN_ALPHABET) for _ in range(rng.randint(1, 7)))
        if p not in seen:
            seen.add(p)
            patterns.append(p)
    names = ["".join(t) for n in range(4) for t in itertools.product(NAME_ALPHABET, repeat=n)]
    cases = []
    for p in patterns:
        cases.append([p, [i for i, name in enumerate(names) if matches(p, name)]])
    out = Path(__file__).parent / "data" / "fnmatch.json"
    fixture = {
        "generator": "dataplane/tests/gen_fnmatch_fixture.py",
        "python": sys.version,
        "names": names,
        "cases": cases,
    }
    out.write_text(json.dumps(fixture, separators=(",", ":"), ensure_ascii=False) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
