"""Least privilege in etcd: the roles `ringmesh etcd-roles` (and deploy/etcd/roles.sh)
make, and a real sidecar and scaler working under them and nothing more.

One etcd for the module: TLS, authentication on, and JWT tokens that live 2 s. Simple
tokens would not do: etcd extends one on every use, so a busy sidecar's never expires,
while a JWT token expires 2 s after it was issued, however much it is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from proto import demo_pb2, demo_pb2_grpc
from registry.embedded import find_etcd, free_port
from registry.errors import PermissionDenied
from registry.etcd import EtcdClient, EtcdConfig, Permission, WatchEvent
from registry.keys import KeyLayout
from registry.scaling import Policy, Target
from ringmesh.procs import Child, python_module
from tests.integration.certs import make_pki, openssl
from tests.load import Load
from tests.mesh import Instance, stats
from tests.waiting import until

pytestmark = pytest.mark.integration

TOKEN_TTL = 2  # seconds a JWT token lives
ROOT_PASSWORD = "r00t/pw"
PASSWORD = "s3cret-pw"
P = "/ringmesh/v1"
LAYOUT = KeyLayout(P)
SIDECAR_ROLE = "ringmesh/v1/sidecar/echo"
SCALER_ROLE = "ringmesh/v1/scaler"
# Written out, not computed from registry/roles.py: a role with one permission more or
# less than documented fails here.
SIDECAR_PERMISSIONS = {
    Permission(f"{P}/", f"{P}0", "read"),
    Permission(f"{P}/instances/echo/", f"{P}/instances/echo0", "readwrite"),
    Permission(f"{P}/load/echo/", f"{P}/load/echo0", "readwrite"),
}
SCALER_PERMISSIONS = {
    Permission(f"{P}/", f"{P}0", "read"),
    Permission(f"{P}/targets/", f"{P}/targets0", "readwrite"),
    Permission(f"{P}/election/scaler/", f"{P}/election/scaler0", "readwrite"),
}


@dataclass(frozen=True)
class SecureEtcd:
    url: str
    ca: Path
    etcdctl: str
    work: Path

    def config(self, user: str, password: str) -> EtcdConfig:
        return EtcdConfig.from_urls(
            self.url, ca_file=str(self.ca), user=user, password=password, timeout=3.0
        )

    def flags(self, user: str) -> tuple[str, ...]:
        """A ringmesh command's etcd flags as ``user``; the password goes in env()."""
        return ("--etcd", self.url, "--etcd-ca", str(self.ca), "--etcd-user", user)

    def env(self, password: str) -> dict[str, str]:
        return {**os.environ, "RINGMESH_ETCD_PASSWORD": password}

    def ctl(self, *args: str) -> str:
        """etcdctl as root; its stdout."""
        done = subprocess.run(
            [self.etcdctl, "--endpoints", self.url, "--cacert", str(self.ca), *args],
            env={**os.environ, "ETCDCTL_USER": "root", "ETCDCTL_PASSWORD": ROOT_PASSWORD},
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    def auth_revision(self) -> int:
        return int(json.loads(self.ctl("-w", "json", "auth", "status"))["authRevision"])

    def password_file(self, password: str) -> Path:
        path = self.work / f"password-{abs(hash(password))}"
        path.write_text(password + "\n")
        return path

    def etcd_roles(self, *args: str, password: str = PASSWORD) -> str:
        """`ringmesh etcd-roles ARGS --password-file ...` as root; its stdout."""
        done = subprocess.run(
            [*python_module("ringmesh", "etcd-roles", *args), *self.flags("root"),
             "--password-file", str(self.password_file(password))],
            env=self.env(ROOT_PASSWORD), capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return done.stdout


def _spawn_etcd(work: Path) -> tuple[subprocess.Popen[bytes], SecureEtcd]:
    pki = make_pki(work / "pki")
    binary = openssl()
    assert binary is not None
    jwt_key, jwt_pub = work / "jwt.key", work / "jwt.pub"
    for args in (
        ["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(jwt_key)],
        ["ec", "-in", str(jwt_key), "-pubout", "-out", str(jwt_pub)],
    ):
        subprocess.run([binary, *args], check=True, capture_output=True, timeout=30)
    url = f"https://127.0.0.1:{free_port()}"
    peer = f"http://127.0.0.1:{free_port()}"
    args = [
        find_etcd(),
        "--name", "roles",
        "--data-dir", str(work / "data"),
        "--listen-client-urls", url,
        "--advertise-client-urls", url,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"roles={peer}",
        "--cert-file", str(pki.server_cert),
        "--key-file", str(pki.server_key),
        "--auth-token",
        f"jwt,pub-key={jwt_pub},priv-key={jwt_key},sign-method=ES256,ttl={TOKEN_TTL}s",
        "--log-level", "error",
    ]  # fmt: skip
    env = dict(os.environ)
    if platform.machine() in ("aarch64", "arm64"):
        env.setdefault("ETCD_UNSUPPORTED_ARCH", "arm64")
    with open(work / "etcd.log", "wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    etcdctl = shutil.which("etcdctl") or str(Path(find_etcd()).with_name("etcdctl"))
    return proc, SecureEtcd(url, pki.ca, etcdctl, work)


def _wait_healthy(proc: subprocess.Popen[bytes], etcd: SecureEtcd) -> None:
    context = ssl.create_default_context(cafile=str(etcd.ca))
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, (etcd.work / "etcd.log").read_text()[-2000:]
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(etcd.url + "/health", timeout=1, context=context) as response,
        ):
            if b'"health":"true"' in response.read():
                return
        assert time.monotonic() < deadline, "etcd did not become healthy"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    """etcd on https, auth on (root's password ROOT_PASSWORD), 2-second JWT tokens."""
    if openssl() is None:
        pytest.skip("openssl is not installed: cannot make certificates and token keys")
    proc, etcd = _spawn_etcd(tmp_path_factory.mktemp("etcd-roles"))
    try:
        _wait_healthy(proc, etcd)
        base = [etcd.etcdctl, "--endpoints", etcd.url, "--cacert", str(etcd.ca)]
        for args in (
            ["user", "add", f"root:{ROOT_PASSWORD}", "--interactive=false"],
            ["user", "grant-role", "root", "root"],
            ["auth", "enable"],
        ):
            subprocess.run([*base, *args], check=True, capture_output=True, timeout=30)
        yield etcd
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def users(secure_etcd: SecureEtcd) -> SecureEtcd:
    """Users ``echo`` (the sidecars of echo) and ``scaler``, made by `ringmesh etcd-roles`."""
    made = secure_etcd.etcd_roles("sidecar", "echo", "--user", "echo")
    assert made.splitlines() == [
        f"role {SIDECAR_ROLE}: created",
        f"role {SIDECAR_ROLE}: granted read [{P}/, {P}0)",
        f"role {SIDECAR_ROLE}: granted readwrite [{P}/instances/echo/, {P}/instances/echo0)",
        f"role {SIDECAR_ROLE}: granted readwrite [{P}/load/echo/, {P}/load/echo0)",
        "user echo: created",
        f"user echo: granted role {SIDECAR_ROLE}",
    ]
    secure_etcd.etcd_roles("scaler", "--user", "scaler")
    return secure_etcd


def as_root(etcd: SecureEtcd) -> EtcdClient:
    return EtcdClient(etcd.config("root", ROOT_PASSWORD))


async def role_state(etcd: SecureEtcd, role: str, user: str) -> tuple[object, object]:
    async with as_root(etcd) as root:
        return await root.role_permissions(role), await root.user_roles(user)


# --- the roles ---------------------------------------------------------------------------


def test_the_roles_hold_exactly_what_is_documented_and_a_rerun_changes_nothing(
    users: SecureEtcd,
) -> None:
    etcd = users
    assert asyncio.run(role_state(etcd, SIDECAR_ROLE, "echo")) == (
        SIDECAR_PERMISSIONS,
        {SIDECAR_ROLE},
    )
    assert asyncio.run(role_state(etcd, SCALER_ROLE, "scaler")) == (
        SCALER_PERMISSIONS,
        {SCALER_ROLE},
    )

    revision = etcd.auth_revision()  # every write to users or roles raises it
    assert etcd.etcd_roles("sidecar", "echo", "--user", "echo").splitlines() == [
        f"role {SIDECAR_ROLE} and user echo: nothing to change"
    ]
    assert etcd.etcd_roles("scaler", "--user", "scaler").splitlines() == [
        f"role {SCALER_ROLE} and user scaler: nothing to change"
    ]
    assert etcd.auth_revision() == revision


def test_a_rerun_takes_back_what_was_added_by_hand(users: SecureEtcd) -> None:
    etcd = users
    # A role and user of their own: the other tests' users stay as they are.
    etcd.etcd_roles("sidecar", "books", "--user", "books")
    role = "ringmesh/v1/sidecar/books"
    etcd.ctl("role", "grant-permission", role, "--prefix=true", "readwrite", f"{P}/")
    etcd.ctl("role", "grant-permission", role, "write", "/elsewhere")
    etcd.ctl("user", "grant-role", "books", SCALER_ROLE)

    changes = etcd.etcd_roles("sidecar", "books", "--user", "books", password="new-pw")
    assert sorted(changes.splitlines()) == sorted(
        [
            f"role {role}: revoked write /elsewhere",
            f"role {role}: granted read [{P}/, {P}0)",
            "user books: password set",
            f"user books: revoked role {SCALER_ROLE}",
        ]
    )
    permissions, roles = asyncio.run(role_state(etcd, role, "books"))
    assert roles == {role}
    assert permissions == {
        Permission(f"{P}/", f"{P}0", "read"),
        Permission(f"{P}/instances/books/", f"{P}/instances/books0", "readwrite"),
        Permission(f"{P}/load/books/", f"{P}/load/books0", "readwrite"),
    }

    async def books_reads() -> None:
        async with EtcdClient(etcd.config("books", "new-pw")) as books:
            await books.get(f"{P}/policy/books")

    asyncio.run(books_reads())


def test_roles_sh_makes_the_same_roles_as_the_cli(users: SecureEtcd) -> None:
    etcd = users
    script = Path(__file__).parents[2] / "deploy" / "etcd" / "roles.sh"
    env = {
        **os.environ,
        "ETCDCTL": etcd.etcdctl,
        "ETCDCTL_ENDPOINTS": etcd.url,
        "ETCDCTL_CACERT": str(etcd.ca),
        "ETCDCTL_USER": "root",
        "ETCDCTL_PASSWORD": ROOT_PASSWORD,
    }
    password_file = str(etcd.password_file(PASSWORD))
    runs = [
        subprocess.run(
            ["sh", str(script), *args], env=env, capture_output=True, text=True, timeout=60
        )
        for args in (
            ("sidecar", "maps", "maps", password_file),
            ("sidecar", "maps", "maps", password_file),
        )
    ]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert "User maps created" in runs[0].stdout
    assert runs[1].stdout == ""  # the second run changed nothing
    # The CLI finds nothing to change: both make the same role, user and password.
    assert etcd.etcd_roles("sidecar", "maps", "--user", "maps").splitlines() == [
        "role ringmesh/v1/sidecar/maps and user maps: nothing to change"
    ]


# --- what the roles allow and refuse -----------------------------------------------------


def test_the_sidecar_and_scaler_users_cannot_write_outside_their_keys(users: SecureEtcd) -> None:
    etcd = users

    async def scenario() -> None:
        async with (
            as_root(etcd) as root,
            EtcdClient(etcd.config("echo", PASSWORD)) as echo,
            EtcdClient(etcd.config("scaler", PASSWORD)) as scaler,
        ):
            other_lease = await root.grant_lease(30)
            await root.put(f"{P}/instances/other/o-1", b"{}", lease=other_lease)

            # What each needs works (so the refusals below are about the keys).
            lease = await echo.grant_lease(30)
            await echo.put(f"{P}/instances/echo/probe", b"{}", lease=lease)
            await echo.put(f"{P}/load/echo/probe", b"{}", lease=lease)
            assert (await echo.get(f"{P}/instances/other/o-1")) is not None
            await echo.revoke_lease(lease)
            await scaler.put(f"{P}/targets/probe", b"{}", lease=None)
            assert await scaler.delete(f"{P}/targets/probe")

            for client, key in (
                (echo, f"{P}/targets/echo"),
                (echo, f"{P}/instances/other/x"),
                (echo, f"{P}/instances/echo-2/x"),  # a service whose name starts alike
                (echo, f"{P}/load/other/x"),
                (echo, f"{P}/policy/echo"),
                (echo, f"{P}/authz/echo"),
                (echo, f"{P}/election/scaler/x"),
                (echo, "/elsewhere/x"),
                (scaler, f"{P}/instances/echo/x"),
                (scaler, f"{P}/load/echo/x"),
                (scaler, f"{P}/policy/echo"),
                (scaler, f"{P}/authz/echo"),
            ):
                with pytest.raises(PermissionDenied):
                    await client.put(key, b"{}", lease=None)
            with pytest.raises(PermissionDenied):
                await echo.delete(f"{P}/instances/other/o-1")
            with pytest.raises(PermissionDenied):
                await echo.get("/elsewhere/x")  # read is on the mesh prefix only
            with pytest.raises(PermissionDenied):
                await anext(echo.watch_prefix("/elsewhere/", start_revision=1))
            with pytest.raises(PermissionDenied):  # it would delete other/o-1
                await echo.revoke_lease(other_lease)
            assert (await root.get(f"{P}/instances/other/o-1")) is not None
            await root.revoke_lease(other_lease)

    asyncio.run(scenario())


# --- tokens --------------------------------------------------------------------------------


def test_a_change_to_users_or_roles_does_not_lock_clients_out(users: SecureEtcd) -> None:
    """A JWT token from before the change is refused ("revision ... old"), not expired."""
    etcd = users

    async def scenario() -> None:
        async with as_root(etcd) as root, EtcdClient(etcd.config("echo", PASSWORD)) as echo:
            await echo.get(f"{P}/policy/echo")  # a token, good for TOKEN_TTL more seconds
            started = time.monotonic()
            await root.add_role("unrelated")
            await echo.get(f"{P}/policy/echo")
            assert time.monotonic() - started < TOKEN_TTL  # refused for its age, not expiry

    asyncio.run(scenario())


def test_a_watch_made_after_the_token_expired_sees_its_events(users: SecureEtcd) -> None:
    etcd = users

    async def first(client: EtcdClient, prefix: str, revision: int) -> WatchEvent:
        async for event in client.watch_prefix(prefix, start_revision=revision):
            return event
        raise AssertionError("unreachable")

    async def scenario() -> None:
        async with as_root(etcd) as root, EtcdClient(etcd.config("echo", PASSWORD)) as echo:
            _, revision = await echo.get_prefix(f"{P}/authz/")
            early = asyncio.ensure_future(first(echo, f"{P}/authz/", revision + 1))
            await asyncio.sleep(TOKEN_TTL + 0.5)  # the token expires meanwhile
            late = asyncio.ensure_future(first(echo, f"{P}/policy/", revision + 1))
            await asyncio.sleep(0.5)  # created by now
            await root.put(f"{P}/authz/watched", b'{"allow":[]}', lease=None)
            await root.put(f"{P}/policy/watched", b"{}", lease=None)
            # aetcd took etcd's refusal of the late watch for a new watch 0 in place of
            # the early one: both then waited forever.
            events = await asyncio.wait_for(asyncio.gather(early, late), 5)
            assert [e.key for e in events] == [f"{P}/authz/watched", f"{P}/policy/watched"]
            await root.delete(f"{P}/authz/watched")
            await root.delete(f"{P}/policy/watched")

    asyncio.run(scenario())


# --- a sidecar and a scaler under the roles ------------------------------------------------


def read_as_root(etcd: SecureEtcd, key: str) -> tuple[bytes, int, int] | None:
    """(value, mod revision, lease) of ``key``, None if absent."""

    async def read() -> tuple[bytes, int, int] | None:
        async with as_root(etcd) as root:
            found = await root.get(key)
            return None if found is None else (found.value, found.mod_revision, found.lease)

    return asyncio.run(read())


def set_policy(etcd: SecureEtcd, min_replicas: int) -> None:
    policy = Policy(min_replicas=min_replicas, max_replicas=5, metric="inflight", target=5)

    async def write() -> None:
        async with as_root(etcd) as root:
            await root.put(LAYOUT.policy("echo"), policy.to_json(), lease=None)

    asyncio.run(write())


def target_replicas(etcd: SecureEtcd) -> tuple[int, str] | None:
    found = read_as_root(etcd, LAYOUT.target("echo"))
    if found is None:
        return None
    target = Target.from_json(found[0])
    return target.replicas, target.leader


def served_by(instance: Instance, keys: range) -> set[str]:
    """Which echo instances answer calls through ``instance``'s sidecar, keyed by ``keys``."""
    with grpc.insecure_channel(instance.outbound) as channel:
        stub = demo_pb2_grpc.DemoStub(channel)
        return {
            stub.Echo(
                demo_pb2.EchoRequest(text="hi"),
                metadata=(("ringmesh-service", "echo"), ("ringmesh-hash-key", f"k{key}")),
                timeout=5,
            ).instance
            for key in keys
        }


def test_a_sidecar_and_a_scaler_work_under_their_roles_across_token_expiry(
    users: SecureEtcd, tmp_path: Path
) -> None:
    from ringmesh.localmesh import LocalMesh

    etcd = users
    sidecar_flags = ("--etcd-ca", str(etcd.ca), "--etcd-user", "echo", "--report-interval", "0.5")
    with LocalMesh(etcd.url, prefix=P, logs=tmp_path) as mesh:
        echo1 = mesh.add("echo", "echo-1", *sidecar_flags, env=etcd.env(PASSWORD))
        scaler_log = open(tmp_path / "scaler.log", "wb")  # noqa: SIM115 - closed below
        scaler = Child(
            "scaler",
            python_module("ringmesh", "scaler", *etcd.flags("scaler"), "--id", "scaler-1",
                          "--interval", "0.5", "--ttl", "4"),
            env=etcd.env(PASSWORD), stderr=scaler_log,
        )  # fmt: skip
        try:
            term = scaler.wait_event("leading", timeout=15)["term"]
            set_policy(etcd, min_replicas=2)
            until(lambda: target_replicas(etcd) == (2, "scaler-1"), within=10, what="target 2")
            record = read_as_root(etcd, LAYOUT.instance("echo", "echo-1"))
            assert record is not None
            until(
                lambda: read_as_root(etcd, LAYOUT.load("echo", "echo-1")) is not None,
                within=5,
                what="echo-1's load record",
            )
            assert served_by(echo1, range(5)) == {"echo-1"}
            # A change to users and roles meanwhile (every token before it is refused).
            etcd.etcd_roles("sidecar", "other", "--user", "other")

            time.sleep(2 * TOKEN_TTL + 1)  # every token in use has expired twice over

            # Still registered: the same record under the same lease.
            still = read_as_root(etcd, LAYOUT.instance("echo", "echo-1"))
            assert still is not None and (still[0], still[2]) == (record[0], record[2])
            load_before = read_as_root(etcd, LAYOUT.load("echo", "echo-1"))
            assert load_before is not None
            # An unchanged record is rewritten only every 30 s: calls move the metric the
            # policy scales on (in-flight), and that is written at once, if the put works.
            with Load(echo1.outbound, callers=4, idempotent=True, delay_ms=100, keys=10):
                until(
                    lambda: (
                        (read_as_root(etcd, LAYOUT.load("echo", "echo-1")) or load_before)[1]
                        > load_before[1]
                    ),
                    within=5,
                    what="echo-1 still reporting load",
                )
            # A new instance registers, and echo-1's sidecar routes to it.
            echo2 = mesh.add("echo", "echo-2", *sidecar_flags, env=etcd.env(PASSWORD))
            joined = read_as_root(etcd, LAYOUT.instance("echo", "echo-2"))
            assert joined is not None
            until(
                lambda: stats(echo1)["topology_revision"] >= joined[1],
                within=5,
                what="echo-1 sees echo-2",
            )
            assert served_by(echo1, range(40)) == {"echo-1", "echo-2"}
            # The scaler still leads (the same term) and writes targets.
            set_policy(etcd, min_replicas=3)
            until(lambda: target_replicas(etcd) == (3, "scaler-1"), within=10, what="target 3")
            found = read_as_root(etcd, LAYOUT.target("echo"))
            assert found is not None and Target.from_json(found[0]).term == term
            assert scaler.alive() and echo2.sidecar.alive()
        finally:
            scaler.stop()
            scaler_log.close()
        # The tokens really expired, and were renewed (else the test above proves little).
        for log in (mesh.log_text("sidecar-echo-1"), (tmp_path / "scaler.log").read_text()):
            assert "authenticating again" in log
            assert "Traceback" not in log
