"""`ringmesh policy set|get|delete` against a real etcd."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from registry.embedded import EmbeddedEtcd
from ringmesh import cli

pytestmark = pytest.mark.integration


def ringmesh(etcd: EmbeddedEtcd, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringmesh", *args, "--etcd", etcd.url, "--prefix", prefix],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_set_get_delete_round_trip(shared_etcd: EmbeddedEtcd, prefix: str) -> None:
    done = ringmesh(shared_etcd, prefix, "policy", "set", "orders", "--min", "2", "--max", "10",
                    "--metric", "inflight", "--target", "5", "--mode", "predictive")  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = ringmesh(shared_etcd, prefix, "policy", "get", "orders")
    assert got.returncode == 0
    assert json.loads(got.stdout) == {
        "min_replicas": 2, "max_replicas": 10, "metric": "inflight", "target": 5.0, "tolerance": 0.1,
        "scale_up_window_s": 0.0, "scale_down_window_s": 300.0, "mode": "predictive",
    }  # fmt: skip
    assert ringmesh(shared_etcd, prefix, "policy", "delete", "orders").returncode == 0
    gone = ringmesh(shared_etcd, prefix, "policy", "get", "orders")
    assert gone.returncode == 1
    assert "no policy for service 'orders'" in gone.stderr
    assert ringmesh(shared_etcd, prefix, "policy", "delete", "orders").returncode == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min", "5", "--max", "2", "--metric", "rps", "--target", "100"], "min_replicas"),
        (["--min", "1", "--max", "2", "--metric", "rps", "--target", "0"], "target"),
        (
            ["--min", "1", "--max", "2", "--metric", "rps", "--target", "1", "--tolerance", "2"],
            "tolerance",
        ),
        (["--min", "1", "--max", "2", "--metric", "cpu", "--target", "1"], "invalid choice"),
        (["--min", "x", "--max", "2", "--metric", "rps", "--target", "1"], "invalid int value"),
    ],
)
def test_bad_policies_are_usage_errors_and_change_nothing(
    shared_etcd: EmbeddedEtcd,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    base = ["--etcd", shared_etcd.url, "--prefix", prefix]
    assert (
        cli.main(
            [
                "policy",
                "set",
                "orders",
                "--min",
                "1",
                "--max",
                "3",
                "--metric",
                "rps",
                "--target",
                "50",
                *base,
            ]
        )
        == 0
    )
    refused = ringmesh(shared_etcd, prefix, "policy", "set", "orders", *args)
    assert refused.returncode == 2
    assert message in refused.stderr
    assert len(refused.stderr.strip().splitlines()) <= 3, "one clear line, not a traceback"
    capsys.readouterr()
    assert cli.main(["policy", "get", "orders", *base]) == 0
    assert json.loads(capsys.readouterr().out)["max_replicas"] == 3, (
        "the stored policy is unchanged"
    )


def test_bad_service_name_is_a_usage_error(shared_etcd: EmbeddedEtcd, prefix: str) -> None:
    done = ringmesh(shared_etcd, prefix, "policy", "get", "Not_A_Label")
    assert done.returncode == 2
    assert "invalid service name" in done.stderr
