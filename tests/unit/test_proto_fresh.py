"""The generated protobuf modules are what the .proto sources produce now."""

from __future__ import annotations

from proto.__main__ import OUTPUT_SUFFIXES, PROTO_DIR, sources, stale_modules


def test_there_are_proto_sources_and_their_modules_are_committed() -> None:
    names = [src.stem for src in sources()]
    assert "demo" in names
    for stem in names:
        for suffix in OUTPUT_SUFFIXES:
            assert (PROTO_DIR / f"{stem}{suffix}").is_file(), f"{stem}{suffix} is missing"


def test_generated_modules_are_fresh() -> None:
    assert stale_modules() == [], "run: python -m proto"
