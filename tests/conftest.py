"""Fixtures that start real things: an etcd process, demo apps and sidecars via the CLI."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from registry.embedded import EmbeddedEtcd
from tests.mesh import Mesh

T = TypeVar("T")
_prefixes = itertools.count(1)


@pytest.fixture(scope="module")
def shared_etcd() -> Iterator[EmbeddedEtcd]:
    """One etcd for a module's tests that do not break it; each test gets its own prefix."""
    with EmbeddedEtcd() as etcd:
        yield etcd


@pytest.fixture
def etcd() -> Iterator[EmbeddedEtcd]:
    """A fresh etcd of the test's own (it may kill and restart it)."""
    with EmbeddedEtcd() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"/ringmesh-test/{next(_prefixes)}"


@pytest.fixture
def mesh(shared_etcd: EmbeddedEtcd, prefix: str, tmp_path: Any) -> Iterator[Mesh]:
    with Mesh(shared_etcd, prefix=prefix, logs=tmp_path) as m:
        yield m


@pytest.fixture
def own_mesh(etcd: EmbeddedEtcd, tmp_path: Any) -> Iterator[Mesh]:
    with Mesh(etcd, prefix="/ringmesh/v1", logs=tmp_path) as m:
        yield m


@pytest.fixture
def run() -> Callable[[Coroutine[Any, Any, T]], T]:
    return asyncio.run
