"""The proxy benchmark's picture: calls/s and p50/p99 latency per path, from its JSON.

``python -m bench.plot [bench/proxy-results.json] [out.png]`` redraws it from a saved run.
Needs matplotlib (the ``dev`` extra); draws with the Agg backend, no display.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"] if r["workload"] == "unary"]
    paths = [p for p in result["config"]["paths"] if any(r["path"] == p for r in rows)]
    levels = sorted({int(r["concurrency"]) for r in rows})
    by = {(r["path"], int(r["concurrency"])): r for r in rows}
    payload = result["config"]["payload"]

    fig, axes = plt.subplots(1, 1 + len(levels), figsize=(5.2 * (1 + len(levels)), 4.6))
    width = 0.8 / max(len(levels), 1)
    xs = range(len(paths))

    ax = axes[0]
    for k, c in enumerate(levels):
        values = [by[(p, c)]["calls_per_s"] if (p, c) in by else 0.0 for p in paths]
        lows = [
            v - by[(p, c)]["calls_per_s_min"] if (p, c) in by else 0.0
            for p, v in zip(paths, values, strict=True)
        ]
        highs = [
            by[(p, c)]["calls_per_s_max"] - v if (p, c) in by else 0.0
            for p, v in zip(paths, values, strict=True)
        ]
        offset = [x + (k - (len(levels) - 1) / 2) * width for x in xs]
        bars = ax.bar(offset, values, width, yerr=[lows, highs], capsize=3, label=f"{c} concurrent")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_xticks(list(xs), paths)
    ax.set_ylabel("calls/s (median of rounds; bars: min-max)")
    ax.set_title(f"unary {payload} B: throughput")
    ax.legend(fontsize=8)

    for ax, c in zip(axes[1:], levels, strict=True):
        for k, (key, label) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"))):
            values = [by[(p, c)][key] if (p, c) in by else 0.0 for p in paths]
            offset = [x + (k - 0.5) * 0.4 for x in xs]
            bars = ax.bar(offset, values, 0.4, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_xticks(list(xs), paths)
        ax.set_ylabel("ms (median of rounds)")
        ax.set_title(f"unary {payload} B: latency at {c} concurrent")
        ax.legend(fontsize=8)

    machine = result["machine"]
    fig.suptitle(
        f"ringmesh proxy benchmark — {machine['nproc']} cores, {machine['cpu_model']}; "
        f"native plane {result['native_build_profile']} build; commit {result['git']['commit'][:10]}"
        f"{' (dirty)' if result['git']['dirty'] else ''}; {result['config']['rounds']} round(s) "
        f"x {result['config']['duration']:g} s",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    source = Path(args[0]) if args else HERE / "proxy-results.json"
    out = Path(args[1]) if len(args) > 1 else source.with_suffix(".png")
    plot(json.loads(source.read_text()), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
