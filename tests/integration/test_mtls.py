"""Mutual TLS between sidecars and live authorization, with real processes and etcd.

Certificates come from `ringmesh certs` (the CLI, as an operator makes them).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from proto import demo_pb2, demo_pb2_grpc
from registry.etcd import EtcdClient, EtcdConfig
from registry.records import InstanceRecord
from tests.mesh import Instance, Mesh, stats
from tests.waiting import until

pytestmark = pytest.mark.integration


def certs(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "ringmesh", "certs", *args],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    certs("init", str(root))
    for service in ("echo", "client", "other"):
        certs("issue", str(root), service)
    return root


def add(mesh: Mesh, service: str, pki: Path, *extra: str) -> Instance:
    return mesh.add(service, None, "--tls-dir", str(pki / service), *extra)


def echo(
    instance: Instance, *metadata: tuple[str, str], key: str = "k"
) -> tuple[str, dict[str, str]]:
    with grpc.insecure_channel(instance.outbound) as channel:
        reply, call = mesh_stub(channel).Echo.with_call(
            demo_pb2.EchoRequest(text="x"),
            metadata=(("ringmesh-service", "echo"), ("ringmesh-hash-key", key), *metadata),
            timeout=10,
        )
    return reply.instance, dict(call.trailing_metadata())


def mesh_stub(channel: grpc.Channel) -> demo_pb2_grpc.DemoStub:
    return demo_pb2_grpc.DemoStub(channel)


def test_a_mesh_call_over_mtls_names_the_caller_and_a_forged_caller_changes_nothing(
    mesh: Mesh, pki: Path
) -> None:
    server = add(mesh, "echo", pki)
    client = add(mesh, "client", pki)
    instance, trailers = echo(client, ("ringmesh-caller", "admin"))
    assert instance == server.name
    assert trailers["x-ringmesh-caller"] == "client"  # from the certificate, not the forgery


def handshake(address: str, context: ssl.SSLContext) -> None:
    host, _, port = address.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        if not tls.recv(1):  # TLS 1.3: a refused client certificate shows on the first read
            raise ConnectionError("closed")


def test_only_mesh_peers_get_in(mesh: Mesh, pki: Path, tmp_path: Path) -> None:
    server = add(mesh, "echo", pki)
    # Plaintext at a TLS inbound port: refused.
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
        mesh_stub(channel).Echo(demo_pb2.EchoRequest(text="x"), timeout=5)
    # A certificate from another CA: refused.
    foreign = tmp_path / "foreign"
    certs("init", str(foreign))
    certs("issue", str(foreign), "client")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(foreign / "client" / "cert.pem", foreign / "client" / "key.pem")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        handshake(server.address, context)
    # The mesh's own certificate: in.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(pki / "client" / "cert.pem", pki / "client" / "key.pem")
    handshake(server.address, context)


def test_a_sidecar_refuses_a_certificate_for_another_service(mesh: Mesh, pki: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ringmesh", "sidecar", "--service", "echo", "--app", "127.0.0.1:1",
         "--etcd", mesh.etcd.url, "--tls-dir", str(pki / "other"),
         "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "the certificate is for service 'other', not 'echo'" in done.stderr


def test_a_peer_whose_certificate_names_another_service_is_failed_over(
    mesh: Mesh, pki: Path
) -> None:
    real = add(mesh, "echo", pki)
    impostor = add(mesh, "other", pki)
    client = add(mesh, "client", pki)

    async def register_impostor_as_echo() -> None:
        record = InstanceRecord(id="impostor", service="echo", address=impostor.address)
        async with EtcdClient(EtcdConfig.from_urls(mesh.etcd.url)) as etcd:
            await etcd.put(mesh.layout.instance("echo", "impostor"), record.to_json(), lease=None)

    asyncio.run(register_impostor_as_echo())
    mesh.seen_by(client)
    served = {echo(client, key=f"k{i}")[0] for i in range(40)}
    assert served == {real.name}  # every call answered by the real echo, none failed
    until(
        lambda: "impostor" in stats(client)["ejected"].get("echo", []),
        within=5,
        what="the impostor ejected",
    )


def authz(mesh: Mesh, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "ringmesh", "authz", *args, "--etcd", mesh.etcd.url, "--prefix", mesh.prefix],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def test_authz_denies_and_allows_within_a_second_under_load(mesh: Mesh, pki: Path) -> None:
    add(mesh, "echo", pki)
    client = add(mesh, "client", pki)
    other = add(mesh, "other", pki)
    outcomes: dict[str, list[tuple[float, str]]] = {"client": [], "other": []}
    stop = threading.Event()

    def load(instance: Instance, name: str) -> None:
        with grpc.insecure_channel(instance.outbound) as channel:
            stub = mesh_stub(channel)
            while not stop.is_set():
                try:
                    stub.Echo(
                        demo_pb2.EchoRequest(text="x"),
                        metadata=(("ringmesh-service", "echo"),),
                        timeout=10,
                    )
                    outcomes[name].append((time.monotonic(), "OK"))
                except grpc.RpcError as exc:
                    outcomes[name].append((time.monotonic(), exc.code().name))

    threads = [
        threading.Thread(target=load, args=(i, n))
        for i, n in ((client, "client"), (other, "other"))
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        writing = time.monotonic()
        authz(mesh, "allow", "echo", "other")  # a list that omits client
        until(
            lambda: outcomes["client"] and outcomes["client"][-1][1] == "PERMISSION_DENIED",
            within=1.0,
            what="client denied within 1 s",
        )
        authz(mesh, "allow", "echo", "client")
        allowed_at = time.monotonic()
        until(
            lambda: outcomes["client"][-1][1] == "OK" and outcomes["client"][-1][0] > allowed_at,
            within=1.0,
            what="client allowed again within 1 s",
        )
        time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert {o for _, o in outcomes["other"]} == {"OK"}  # nobody else failed
    assert {o for t, o in outcomes["client"] if t < writing} == {"OK"}
    assert (
        stats(mesh.instances[next(n for n in mesh.instances if n.startswith("echo"))])[
            "authz_denied"
        ]
        > 0
    )


def test_rotating_every_certificate_under_load_loses_no_call(mesh: Mesh, pki: Path) -> None:
    add(mesh, "echo", pki)
    client = add(mesh, "client", pki)
    failures: list[str] = []
    calls = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal calls
        with grpc.insecure_channel(client.outbound) as channel:
            stub = mesh_stub(channel)
            while not stop.is_set():
                try:
                    stub.Echo(
                        demo_pb2.EchoRequest(text="x"),
                        metadata=(
                            ("ringmesh-service", "echo"),
                            ("ringmesh-hash-key", f"r{calls % 50}"),
                        ),
                        timeout=10,
                    )
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                calls += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(0.5)
        for service in ("echo", "client"):
            certs("issue", str(pki), service, "--force")
        log = lambda name: mesh.log_text(f"sidecar-{name}")  # noqa: E731
        until(
            lambda: all("reloaded the mesh certificate" in log(n) for n in mesh.instances),
            within=10,
            what="every sidecar reloaded its certificate",
        )
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=15)
    assert failures == []
    assert calls > 50


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_an_expired_or_not_yet_valid_certificate_is_refused_with_a_line_that_says_so(
    mesh: Mesh, pki: Path, tmp_path: Path, when: str
) -> None:
    import datetime

    from ringmesh import certs as mesh_certs

    now = datetime.datetime.now(datetime.UTC)
    ca = mesh_certs.new_ca(now=now - datetime.timedelta(days=5))  # old enough to sign the past
    issued_at = (
        now - datetime.timedelta(days=2) if when == "expired" else now + datetime.timedelta(days=2)
    )
    leaf = mesh_certs.issue(ca, "echo", now=issued_at, days=1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cert.pem").write_bytes(mesh_certs._cert_pem(leaf.certificate))
    (bad / "key.pem").write_bytes(mesh_certs._key_pem(leaf.key))
    (bad / "ca.pem").write_bytes(mesh_certs._cert_pem(ca.certificate))
    done = subprocess.run(
        [sys.executable, "-m", "ringmesh", "sidecar", "--service", "echo", "--app", "127.0.0.1:1",
         "--etcd", mesh.etcd.url, "--tls-dir", str(bad),
         "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert ("expired at" if when == "expired" else "is not valid yet") in done.stderr
