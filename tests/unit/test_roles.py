"""The etcd roles' pure part: permissions, and the plan that brings etcd in line."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.errors import ConfigError
from registry.etcd import Permission
from registry.keys import KeyLayout
from registry.roles import (
    Change,
    plan_role,
    plan_user,
    prefix_range_end,
    read_password_file,
    scaler_role,
    sidecar_role,
    validate_user,
)

LAYOUT = KeyLayout("/mesh")


def test_a_prefix_range_ends_past_every_key_under_it() -> None:
    assert prefix_range_end("/mesh/") == "/mesh0"
    end = prefix_range_end("/mesh/instances/echo/")
    assert "/mesh/instances/echo/z" < end <= "/mesh/instances/echo0"
    assert "/mesh/instances/echo-2/x" < "/mesh/instances/echo/"  # not in the range


def test_role_names_carry_the_prefix() -> None:
    assert sidecar_role(LAYOUT, "echo").name == "mesh/sidecar/echo"
    assert scaler_role(LAYOUT).name == "mesh/scaler"
    assert sidecar_role(KeyLayout("/other"), "echo").name != sidecar_role(LAYOUT, "echo").name


def test_a_new_role_is_created_then_granted_in_order() -> None:
    spec = scaler_role(LAYOUT)
    changes = plan_role(spec, None)
    assert changes[0] == Change("add-role", "mesh/scaler")
    assert [c.permission for c in changes[1:]] == sorted(spec.permissions)


def test_a_role_in_line_needs_nothing_and_extras_are_revoked() -> None:
    spec = sidecar_role(LAYOUT, "echo")
    assert plan_role(spec, spec.permissions) == []
    read_all = Permission("/mesh/", "/mesh0", "read")
    too_much = Permission("/mesh/", "/mesh0", "readwrite")
    extra = Permission("/elsewhere", "", "write")
    current = (spec.permissions - {read_all}) | {too_much, extra}
    assert plan_role(spec, current) == [
        Change("revoke", spec.name, permission=extra),
        Change("grant", spec.name, permission=read_all),  # replaces readwrite on that range
    ]


def test_a_user_ends_with_exactly_its_role_and_password() -> None:
    assert plan_user("u", "r", None, password_ok=False) == [
        Change("add-user", "u"),
        Change("grant-role", "u", role="r"),
    ]
    assert plan_user("u", "r", {"r"}, password_ok=True) == []
    assert plan_user("u", "r", {"root", "x"}, password_ok=False) == [
        Change("set-password", "u"),
        Change("revoke-role", "u", role="root"),
        Change("revoke-role", "u", role="x"),
        Change("grant-role", "u", role="r"),
    ]
    assert str(Change("revoke-role", "u", role="x")) == "user u: revoked role x"


def test_root_and_odd_user_names_are_refused() -> None:
    for bad in ("root", "", "a b", "a:b"):
        with pytest.raises(ConfigError):
            validate_user(bad)


def test_the_password_is_the_first_line_without_its_line_end(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("s3cret pw\n")
    assert read_password_file(str(path)) == "s3cret pw"
    for text in ("", "\n", "a\nb\n"):
        path.write_text(text)
        with pytest.raises(ConfigError):
            read_password_file(str(path))
    with pytest.raises(ConfigError):
        read_password_file(str(tmp_path / "missing"))
