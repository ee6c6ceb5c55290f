"""The terminal view of `ringmesh up`: a live screen on a TTY, plain lines anywhere else.

The live screen (rich) redraws four times a second: per service its
instances with ring share, calls/s, in-flight, p99, error rate and cache
hit rate, target vs live replicas and the reason of the last decision; the
leading scaler; the calls so far (failed, failed over, hit rate keyed vs
unkeyed); the story's step; and the last events. Without a TTY (a pipe, a
log, CI) there are no escape codes: each event is one line as it happens.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ringmesh.loadgen import KEYED, UNKEYED
from ringmesh.observe import Event, MeshObserver

EVENT_LINES = 12
EVENT_STYLE = {
    "scale-out": "bold green",
    "scale-in": "bold yellow",
    "killed": "bold red",
    "failed": "bold red",
    "failover": "magenta",
    "ejection": "magenta",
    "leader": "bold cyan",
    "draining": "yellow",
    "drain": "yellow",
    "drained": "yellow",
    "drain-failed": "bold red",
    "gone": "dim",
    "step": "bold",
}


def _number(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def render(observer: MeshObserver, step: str) -> Group:
    """The whole screen for one redraw."""
    reading = observer.reading
    parts: list[Panel | Table | Text] = []
    tally = observer.tally
    keyed, unkeyed = tally.modes[KEYED], tally.modes[UNKEYED]
    head = Text()
    head.append("ringmesh up", style="bold")
    head.append(f"  {observer.now():5.0f} s   step: {step}\n")
    leader = "none" if reading is None or reading.leader is None else reading.leader
    term = "" if reading is None or reading.term is None else f" (term {reading.term})"
    head.append(f"scaler leader: {leader}{term}   ")
    head.append(
        f"calls {tally.calls}  failed {tally.failed}  failed over {tally.failovers}  "
        f"hit rate keyed {_percent(keyed.hit_rate)} vs unkeyed {_percent(unkeyed.hit_rate)}"
    )
    parts.append(head)
    if reading is not None:
        for service in reading.services.values():
            target = service.target
            title = f"{service.name}: {service.live} live"
            if target is not None:
                title += f", target {target.replicas} ({target.reason})"
            # No vertical rules: nine columns fit an 80-column terminal uncut.
            table = Table(
                title=title,
                title_justify="left",
                expand=False,
                box=box.SIMPLE_HEAD,
                pad_edge=False,
                collapse_padding=True,
            )
            for column in ("instance", "state", "ring", "calls/s", "in-flight", "p99", "errors"):
                table.add_column(
                    column, justify="left" if column in ("instance", "state") else "right"
                )
            table.add_column("hit rate", justify="right")
            table.add_column("age", justify="right")  # of the load/ record the numbers are from
            for row in service.instances:
                table.add_row(
                    row.id,
                    row.state,
                    _percent(row.share),
                    _number(row.rps, 1),
                    _number(row.inflight, 1),
                    _number(row.p99_ms, 1, " ms"),
                    _percent(row.error_rate),
                    _percent(row.hit_rate),
                    _number(row.report_age_s, 0, " s"),
                    style="yellow" if row.state != "serving" else None,
                )
            parts.append(table)
    log = Text()
    for event in observer.events[-EVENT_LINES:]:
        log.append(f"{event.at_s:6.1f}s {event.kind:<10} ", style=EVENT_STYLE.get(event.kind, ""))
        log.append(event.text + "\n")
    parts.append(Panel(log, title="events", title_align="left"))
    return Group(*parts)


def emit(text: str, out: TextIO) -> None:
    """Write a line; once the terminal or pipe is gone (SIGHUP, a closed ssh, `| head`)
    output is lost, never the shutdown that follows it."""
    with contextlib.suppress(OSError, ValueError):
        out.write(text + "\n")
        out.flush()


def plain_line(event: Event) -> str:
    return f"ringmesh up: {event.at_s:6.1f}s {event.kind:<10} {event.text}"


@contextlib.contextmanager
def live_view(
    observer: MeshObserver, step: Callable[[], str], *, out: TextIO | None = None
) -> Iterator[None]:
    """Show the mesh while the block runs: a live screen if ``out`` is a terminal."""
    out = out or sys.stdout
    if not out.isatty():
        observer.on_event = lambda event: emit(plain_line(event), out)
        yield
        return
    console = Console(file=out)

    class Screen:
        def __rich__(self) -> Group:
            return render(observer, step())

    # A log line written straight to the terminal would tear the live screen: while it
    # shows, warnings are printed above it by rich (the events already say what INFO did).
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [RichHandler(console=console, level=logging.WARNING, show_path=False)]
    live = Live(Screen(), console=console, refresh_per_second=4, screen=False)
    live.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):  # the terminal may be gone (SIGHUP)
            live.stop()
        root.handlers = saved
