"""etcd with authentication on: credentials from URLs or flags, token renewal, the CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.embedded import EmbeddedEtcd, find_etcd
from registry.errors import EtcdError
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.topology import read_topology
from ringmesh.localmesh import LocalMesh

pytestmark = pytest.mark.integration

PASSWORD = "s3cret/pw"  # a '/' must survive the URL (percent-encoded there)
URL_PASSWORD = "s3cret%2Fpw"


def etcdctl(etcd: EmbeddedEtcd, *args: str) -> None:
    binary = shutil.which("etcdctl") or str(Path(find_etcd()).with_name("etcdctl"))
    subprocess.run(
        [binary, "--endpoints", etcd.url, *args], check=True, capture_output=True, timeout=30
    )


def with_auth(etcd: EmbeddedEtcd) -> EmbeddedEtcd:
    etcdctl(etcd, "user", "add", f"root:{PASSWORD}", "--interactive=false")
    etcdctl(etcd, "user", "grant-role", "root", "root")
    etcdctl(etcd, "auth", "enable")
    return etcd


@pytest.fixture
def auth_etcd() -> Iterator[EmbeddedEtcd]:
    # Tokens live 1 s, so a client idle for longer must authenticate again.
    with EmbeddedEtcd(extra_args=("--auth-token-ttl", "1")) as etcd:
        yield with_auth(etcd)


def url_with_credentials(etcd: EmbeddedEtcd, password: str = URL_PASSWORD) -> str:
    return etcd.url.replace("http://", f"http://root:{password}@")


def test_credentials_from_the_url_or_flags_and_refusals(auth_etcd: EmbeddedEtcd) -> None:
    async def scenario() -> None:
        for config in (
            EtcdConfig.from_urls(url_with_credentials(auth_etcd)),
            EtcdConfig.from_urls(auth_etcd.url, user="root", password=PASSWORD),
        ):
            async with EtcdClient(config) as client:
                await client.put("/auth/k", b"v", lease=None)
                found = await client.get("/auth/k")
                assert found is not None and found.value == b"v"

        for config, message in (
            (EtcdConfig.from_urls(auth_etcd.url, timeout=2.0), "user name is empty"),
            (EtcdConfig.from_urls(url_with_credentials(auth_etcd, "wrong")), "authentication"),
        ):
            async with EtcdClient(config) as client:
                with pytest.raises(EtcdError, match=message):
                    await client.get("/auth/k")

    asyncio.run(scenario())


def test_an_expired_token_is_renewed(auth_etcd: EmbeddedEtcd) -> None:
    async def scenario() -> None:
        config = EtcdConfig.from_urls(url_with_credentials(auth_etcd))
        async with EtcdClient(config) as client:
            await client.put("/auth/k", b"1", lease=None)
            await asyncio.sleep(2.5)  # the token (TTL 1 s) has expired
            await client.put("/auth/k", b"2", lease=None)
            found = await client.get("/auth/k")
            assert found is not None and found.value == b"2"

    asyncio.run(scenario())


def test_a_sidecar_and_the_cli_with_credentials_in_the_url(
    auth_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    url = url_with_credentials(auth_etcd)
    with LocalMesh(url, logs=tmp_path) as mesh:
        echo = mesh.add("echo")
        shown = subprocess.run(
            [sys.executable, "-m", "ringmesh", "topology", "--json", "--etcd", url],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert [i["id"] for i in doc["services"]["echo"]["instances"]] == [echo.name]

        time.sleep(2.5)  # several token lifetimes later it is still registered

        async def registered() -> set[str]:
            config = EtcdConfig.from_urls(auth_etcd.url, user="root", password=PASSWORD)
            async with EtcdClient(config) as client:
                topology = await read_topology(client, KeyLayout("/ringmesh/v1"))
            return {record.id for record in topology.instances("echo")}

        assert asyncio.run(registered()) == {echo.name}

    refused = subprocess.run(
        [sys.executable, "-m", "ringmesh", "topology", "--etcd", auth_etcd.url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr and "user name is empty" in refused.stderr
