"""Actuators: make the replica count of a service follow its target.

``none`` only writes targets; ``local`` starts and stops instances on this
machine (newest first on the way down, always drained with SIGTERM);
``kubernetes`` patches a Deployment's scale subresource.
"""

from __future__ import annotations

import asyncio
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


class Actuator(Protocol):
    def replicas(self, service: str) -> int | None:
        """What the actuator runs now, or None if it does not know (use the live count)."""

    async def apply(self, service: str, replicas: int) -> None:
        """Converge ``service`` towards ``replicas``."""

    async def aclose(self) -> None: ...


class NoActuator:
    """Targets only: something else (an operator, a CI job) acts on them."""

    def replicas(self, service: str) -> int | None:
        return None

    async def apply(self, service: str, replicas: int) -> None:
        return None

    async def aclose(self) -> None:
        return None


class Launcher(Protocol):
    """Starts one instance of a service; the handle is stopped with ``stop``."""

    def start(self, service: str, index: int) -> Any: ...

    async def stop(self, handle: Any) -> None:
        """Drain (SIGTERM) and wait for the instance to exit."""


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
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), self.drain_timeout)
        except TimeoutError:
            log.warning(
                "instance pid %d did not drain in %ss: killing it", proc.pid, self.drain_timeout
            )
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)


class LocalActuator:
    """Keeps a stack of instances per service: start on top, stop from the top."""

    def __init__(self, launcher: Launcher, *, alive: Callable[[Any], bool] | None = None) -> None:
        self._launcher = launcher
        self._alive = alive or (lambda handle: getattr(handle, "poll", lambda: None)() is None)
        self._stacks: dict[str, list[Any]] = {}
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
            while len(stack) > replicas:
                newest = stack.pop()  # newest first: the oldest keep their keys
                log.info(
                    "%s: draining the newest instance (%d -> %d)", service, len(stack) + 1, replicas
                )
                await self._launcher.stop(newest)

    async def aclose(self) -> None:
        """Drain and stop every instance started here: they are this process's children,
        as under any supervisor; a scaler that takes over starts its own."""
        async with self._lock:
            stacks, self._stacks = self._stacks, {}
            for service, stack in stacks.items():
                while stack:
                    log.info("%s: stopping instance on shutdown (%d left)", service, len(stack))
                    await self._launcher.stop(stack.pop())
