"""Writes tests/data/uhashring.json: what the real uhashring 2.5 answers, for tests/uhashring.rs.

Run from the repository root with the project's venv:
    .venv/bin/python dataplane/tests/gen_uhashring_fixture.py
The Rust ring must agree with uhashring bit for bit: the control plane builds
rings with it, and old Python sidecars route with it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import uhashring
from uhashring import HashRing

VNODES = 160
SIZES = (1, 3, 10, 100)
KEYS = [f"key-{i}" for i in range(100_000)]
SAMPLES = [
    "",
    "key-0",
    "key-99999",
    "ключ-1",
    "键",
    "🔑",
    "a b",
    " ",
    "\n",
    "user:42",
    "tenant/7/order/9",
    "échelle",
    "0",
    "-1",
    "echo-1-0",
    "x" * 300,
    "Ωmega",
    "tab\there",
    "null\x00byte",
    "日本語のキー",
]


def weight(i: int) -> int:
    """Weights 1..4, varied deterministically."""
    return 1 + (i * 7 + i // 3) % 4


def sha256(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def ring_case(size: int) -> dict[str, object]:
    nodes = [(f"echo-{i}", weight(i)) for i in range(1, size + 1)]
    ring = HashRing({name: {"weight": w, "vnodes": VNODES} for name, w in nodes})
    points = [point for point, _ in ring.get_points()]
    assert points == sorted(points)
    owners = [ring.get_node(key) for key in KEYS]
    orders = [",".join(node["nodename"] for node in ring.range(key)) for key in KEYS]
    return {
        "nodes": [{"name": name, "weight": w} for name, w in nodes],
        "vnodes": VNODES,
        "points": len(points),
        "points_sha256": sha256([f"{p:032x}" for p in points]),
        "owners_sha256": sha256(owners),
        "orders_sha256": sha256(orders),
        "samples": [
            {"key": key, "order": [node["nodename"] for node in ring.range(key)]} for key in SAMPLES
        ],
    }


def main() -> None:
    version = getattr(uhashring, "__version__", None)
    from importlib.metadata import version as dist_version

    version = version or dist_version("uhashring")
    assert version == "2.5", version
    fixture = {
        "generator": "dataplane/tests/gen_uhashring_fixture.py",
        "uhashring": version,
        "keys": "key-0 .. key-99999",
        "rings": [ring_case(size) for size in SIZES],
    }
    out = Path(__file__).parent / "data" / "uhashring.json"
    out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
