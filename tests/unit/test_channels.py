"""ChannelPool (sidecar/channels.py): bounded caches and channel clean-up (no server needed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sidecar import channels
from sidecar.channels import ChannelPool


def test_method_names_from_callers_cannot_grow_the_caches_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(channels, "_MAX_CACHED_CALLS", 8)

    async def scenario() -> None:
        pool = ChannelPool()
        for i in range(50):
            assert pool.unary("127.0.0.1:1", f"/x.S/M{i}") is not None
            assert pool.stream("127.0.0.1:1", f"/x.S/M{i}") is not None
        assert len(pool._unary) == 8 and len(pool._stream) == 8
        # Cached ones are reused.
        assert pool.unary("127.0.0.1:1", "/x.S/M0") is pool.unary("127.0.0.1:1", "/x.S/M0")
        await pool.aclose()

    asyncio.run(scenario())


def test_overlapping_retains_close_each_gone_channel_once() -> None:
    async def scenario() -> None:
        pool = ChannelPool()
        for port in (1, 2, 3):
            pool.unary(f"127.0.0.1:{port}", "/x.S/M")
        closed: list[str] = []

        def recording(address: str, close: Callable[[float | None], Awaitable[None]]) -> Any:
            async def wrapper(grace: float | None = None) -> None:
                closed.append(address)
                await asyncio.sleep(0.01)  # let the other retain run meanwhile
                await close(grace)

            return wrapper

        for address, channel in pool._channels.items():
            channel.close = recording(address, channel.close)
        await asyncio.gather(pool.retain({"127.0.0.1:3"}), pool.retain({"127.0.0.1:3"}))
        assert sorted(closed) == ["127.0.0.1:1", "127.0.0.1:2"]
        assert list(pool._channels) == ["127.0.0.1:3"]
        assert all(key[0] == "127.0.0.1:3" for key in pool._unary)
        await pool.aclose()

    asyncio.run(scenario())
