"""Actuators: make the replica count of a service follow its target.

``none`` only writes targets; ``local`` starts and stops instances on this
machine (newest first on the way down, always drained with SIGTERM);
``kubernetes`` patches a Deployment's scale subresource.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from registry.errors import ConfigError, MeshError

log = logging.getLogger(__name__)

KILL_WAIT_S = 5.0  # after SIGKILL; only a process stuck in the kernel takes longer
_POLL_S = 0.05


class Actuator(Protocol):
    def replicas(self, service: str) -> int | None:
        """What the actuator runs now, or None if it does not know (use the live count)."""

    async def apply(self, service: str, replicas: int) -> None:
        """Converge ``service`` towards ``replicas``."""

    def new_term(self) -> None:
        """A leadership starts: forget what was cached about the outside world, which
        another leader may have changed since this one last acted."""

    async def aclose(self) -> None: ...


class NoActuator:
    """Targets only: something else (an operator, a CI job) acts on them."""

    def replicas(self, service: str) -> int | None:
        return None

    async def apply(self, service: str, replicas: int) -> None:
        return None

    def new_term(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class Launcher(Protocol):
    """Starts one instance of a service; the handle is stopped with ``stop``."""

    def start(self, service: str, index: int) -> Any: ...

    async def stop(self, handle: Any) -> None:
        """Drain (SIGTERM) and wait for the instance to exit; kill it after a bound."""


@dataclass
class CommandLauncher:
    """Runs ``templates[service]`` (a shell-free command line) per instance.

    Placeholders: ``{service}``, ``{index}``, ``{etcd}``, ``{prefix}``. The
    command must run the instance's app and its sidecar and exit 0 on SIGTERM
    after draining (e.g. a script that execs both).
    """

    templates: Mapping[str, str]
    etcd: str
    prefix: str
    drain_timeout: float = 30.0
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        for service, template in self.templates.items():
            try:
                self._argv(template, service, 0)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"bad command template for {service!r}: {exc}") from exc

    def _argv(self, template: str, service: str, index: int) -> list[str]:
        return [
            part.format(service=service, index=index, etcd=self.etcd, prefix=self.prefix)
            for part in shlex.split(template)
        ]

    def start(self, service: str, index: int) -> subprocess.Popen[bytes]:
        template = self.templates.get(service)
        if template is None:
            raise MeshError(f"no command template for service {service!r}")
        return subprocess.Popen(
            self._argv(template, service, index),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # an instance logs on stderr; its events are for others
            env=dict(self.env),
            start_new_session=True,
        )

    async def stop(self, handle: Any) -> None:
        proc: subprocess.Popen[bytes] = handle
        _signal_group(proc, signal.SIGTERM)
        if await _exited(proc, within=self.drain_timeout):
            return
        log.warning(
            "instance pid %d did not drain in %ss: killing it", proc.pid, self.drain_timeout
        )
        _signal_group(proc, signal.SIGKILL)
        if not await _exited(proc, within=KILL_WAIT_S):
            log.error("instance pid %d still runs %ss after SIGKILL", proc.pid, KILL_WAIT_S)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it exited just now
            os.killpg(proc.pid, sig)


async def _exited(proc: subprocess.Popen[bytes], *, within: float) -> bool:
    """Wait up to ``within`` seconds for ``proc`` to exit (polled: no thread per instance,
    so any number of instances can be waited for at once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while proc.poll() is None:
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(_POLL_S, left))
    return True


class LocalActuator:
    """Keeps a stack of instances per service: start on top, stop from the top."""

    def __init__(self, launcher: Launcher, *, alive: Callable[[Any], bool] | None = None) -> None:
        self._launcher = launcher
        self._alive = alive or (lambda handle: getattr(handle, "poll", lambda: None)() is None)
        self._stacks: dict[str, list[Any]] = {}
        self._leaving: list[tuple[str, Any]] = []  # being stopped by apply(), not yet gone
        self._started: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def replicas(self, service: str) -> int | None:
        stack = self._stacks.get(service)
        return None if stack is None else len(stack)

    async def apply(self, service: str, replicas: int) -> None:
        async with self._lock:
            stack = self._stacks.setdefault(service, [])
            dead = [h for h in stack if not self._alive(h)]
            for handle in dead:
                log.warning("an instance of %s exited on its own", service)
                stack.remove(handle)
            while len(stack) < replicas:
                index = self._started.get(service, 0) + 1
                self._started[service] = index
                stack.append(self._launcher.start(service, index))
                log.info("%s: started instance %d (%d/%d)", service, index, len(stack), replicas)
            if len(stack) > replicas:
                leaving = stack[replicas:]  # newest first: the oldest keep their keys
                del stack[replicas:]
                log.info(
                    "%s: draining the %d newest instances (%d -> %d)",
                    service,
                    len(leaving),
                    len(stack) + len(leaving),
                    replicas,
                )
                going = [(service, handle) for handle in reversed(leaving)]
                # Until their stop has finished they are still ours to stop: if this
                # apply is cancelled half way, aclose() stops them.
                self._leaving.extend(going)
                await self._stop_all(going)
                for item in going:
                    self._leaving.remove(item)

    def new_term(self) -> None:
        return None  # what it knows is what it runs itself

    async def aclose(self) -> None:
        """Drain and stop every instance started here: they are this process's children,
        as under any supervisor; a scaler that takes over starts its own."""
        async with self._lock:
            stacks, self._stacks = self._stacks, {}
            leaving = [(s, handle) for s, stack in stacks.items() for handle in reversed(stack)]
            leaving += self._leaving
            self._leaving = []
            if leaving:
                log.info("stopping %d instances on shutdown", len(leaving))
            await self._stop_all(leaving)

    async def _stop_all(self, leaving: list[tuple[str, Any]]) -> None:
        """Stop instances together: all drain at once, so scale-down and shutdown take one
        drain timeout (then SIGKILL), not one per instance."""
        results = await asyncio.gather(
            *(self._launcher.stop(handle) for _, handle in leaving), return_exceptions=True
        )
        unexpected: BaseException | None = None
        for (service, _), result in zip(leaving, results, strict=True):
            if isinstance(result, (MeshError, OSError)):
                log.warning("%s: could not stop an instance: %s", service, result)
            elif isinstance(result, BaseException):
                unexpected = unexpected or result
        if unexpected is not None:
            raise unexpected  # a bug, or a cancellation: after every stop has finished
