"""The native data plane: the sidecar's hop, built from this directory's Rust crate.

``sidecar/plane.py`` is the one module that drives it.
"""

from dataplane._native import DataPlane, RingLookup, build_profile, duration_buckets_ms

__all__ = ["DataPlane", "RingLookup", "build_profile", "duration_buckets_ms"]
