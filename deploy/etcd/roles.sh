#!/bin/sh
# The etcd role and user of ringmesh's sidecars of one service, or of its scalers, with
# etcdctl alone: what `ringmesh etcd-roles` does, for operators without ringmesh.
#
#   deploy/etcd/roles.sh sidecar SERVICE USER PASSWORD_FILE
#   deploy/etcd/roles.sh scaler USER PASSWORD_FILE
#
# The role gets exactly these permissions (others it holds are revoked) and the user
# exactly this role (README.md, "etcd users and roles"):
#   sidecar of S: read PREFIX/, readwrite PREFIX/instances/S/ and PREFIX/load/S/
#   scaler:       read PREFIX/, readwrite PREFIX/targets/ and PREFIX/election/scaler/
# Idempotent: nothing is written when all is already so (every write to etcd's users
# and roles retires every JWT token issued before it: each client must fetch a new one).
#
# etcdctl's own variables say where etcd is and give the root credentials, e.g.
#   ETCDCTL_ENDPOINTS=https://10.0.0.5:2379 ETCDCTL_CACERT=ca.pem
#   ETCDCTL_USER=root ETCDCTL_PASSWORD=...
# RINGMESH_PREFIX is the mesh's key prefix (default /ringmesh/v1); ETCDCTL the etcdctl
# to run (default: etcdctl on PATH). The password is the file's first line; etcdctl
# reads it up to the first blank, so it may not hold spaces.
set -eu

PREFIX=${RINGMESH_PREFIX:-/ringmesh/v1}
ETCDCTL=${ETCDCTL:-etcdctl}

usage() {
    echo "usage: $0 sidecar SERVICE USER PASSWORD_FILE" >&2
    echo "       $0 scaler USER PASSWORD_FILE" >&2
    exit 2
}
fail() {
    echo "$0: $*" >&2
    exit 2
}
ctl() { "$ETCDCTL" "$@"; }

case "${1:-}" in
sidecar)
    [ $# -eq 4 ] || usage
    service=$2 user=$3 password_file=$4
    printf '%s\n' "$service" | grep -Eqx '[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?' ||
        fail "invalid service name '$service': must be a DNS label"
    role="${PREFIX#/}/sidecar/$service"
    wanted="read $PREFIX/
readwrite $PREFIX/instances/$service/
readwrite $PREFIX/load/$service/"
    ;;
scaler)
    [ $# -eq 3 ] || usage
    user=$2 password_file=$3
    role="${PREFIX#/}/scaler"
    wanted="read $PREFIX/
readwrite $PREFIX/targets/
readwrite $PREFIX/election/scaler/"
    ;;
*) usage ;;
esac

case "$PREFIX" in /*/ | /) fail "invalid prefix '$PREFIX': must not end with '/'" ;; /*) ;; *) fail "invalid prefix '$PREFIX': must start with '/'" ;; esac
[ "$user" != root ] || fail "root keeps the root role; give this role a user of its own"
case "$user" in '' | *[[:space:]:]*) fail "invalid user name '$user'" ;; esac
[ -r "$password_file" ] || fail "cannot read password file $password_file"
[ "$(wc -l <"$password_file")" -le 1 ] || fail "password file $password_file: expected one line"
password=$(cat "$password_file")
case "$password" in '' | *[[:space:]]*) fail "password file $password_file: empty, or spaces in the password" ;; esac

b64() { printf '%s' "$1" | base64 | tr -d '\n'; }
# The end of the range of keys starting with $1 (etcdctl's --prefix): the last character
# plus one, and every prefix here ends with '/', which '0' follows.
range_end() { printf '%s0' "${1%/}"; }
# One line per permission the role holds: TYPE KEY RANGE_END (base64, as etcd keeps them).
held() {
    ctl -w json role get "$role" | tr -d ' \n' | sed -n 's/.*"perm":\[\(.*\)\].*/\1/p' |
        tr '}' '\n' | while IFS= read -r perm; do
        [ -n "$perm" ] || continue
        type=$(printf '%s' "$perm" | sed -n 's/.*"permType":\([0-9]*\).*/\1/p')
        key=$(printf '%s' "$perm" | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')
        end=$(printf '%s' "$perm" | sed -n 's/.*"range_end":"\([^"]*\)".*/\1/p')
        echo "${type:-0} $key ${end:--}"
    done
}
kind_code() { case "$1" in read) echo 0 ;; write) echo 1 ;; readwrite) echo 2 ;; esac }

# The role, then exactly its permissions.
if ! ctl role get "$role" >/dev/null 2>&1; then
    ctl role add "$role"
fi
wanted_lines=$(printf '%s\n' "$wanted" | while read -r kind prefix; do
    echo "$(kind_code "$kind") $(b64 "$prefix") $(b64 "$(range_end "$prefix")")"
done)
current=$(held)
printf '%s\n' "$current" | while read -r type key end; do
    [ -n "$key" ] || continue
    printf '%s\n' "$wanted_lines" | grep -q " $key $end\$" && continue
    key_text=$(printf '%s' "$key" | base64 -d)
    if [ "$end" = - ]; then
        ctl role revoke-permission "$role" "$key_text"
    elif [ "$end" = AA== ]; then
        ctl role revoke-permission "$role" "$key_text" --from-key
    else
        ctl role revoke-permission "$role" "$key_text" "$(printf '%s' "$end" | base64 -d)"
    fi
done
printf '%s\n' "$wanted" | while read -r kind prefix; do
    line="$(kind_code "$kind") $(b64 "$prefix") $(b64 "$(range_end "$prefix")")"
    printf '%s\n' "$current" | grep -qx "$line" ||
        ctl role grant-permission "$role" --prefix=true "$kind" "$prefix"
done

# The user, with this password and this role only.
if ! roles=$(ctl user get "$user" 2>/dev/null); then
    printf '%s\n' "$password" | ctl user add "$user" --interactive=false
    ctl user grant-role "$user" "$role"
    exit 0
fi
# Does etcd take the password? (In the environment, not on the command line: ps shows no
# password.) With auth off it cannot tell, and the password is set again.
if ETCDCTL_USER=$user ETCDCTL_PASSWORD=$password "$ETCDCTL" auth status 2>&1 |
    grep -Eq 'authentication failed|authentication is not enabled'; then
    printf '%s\n' "$password" | ctl user passwd "$user" --interactive=false
fi
printf '%s\n' "$roles" | sed -n 's/^Roles: *//p' | tr ' ' '\n' | while read -r other; do
    [ -z "$other" ] || [ "$other" = "$role" ] || ctl user revoke-role "$user" "$other"
done
printf '%s\n' "$roles" | sed -n 's/^Roles: *//p' | tr ' ' '\n' | grep -qx "$role" ||
    ctl user grant-role "$user" "$role"
