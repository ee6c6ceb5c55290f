"""Protocol buffer sources and the Python modules generated from them.

Regenerate with ``python -m proto``; never edit ``*_pb2*.py`` by hand.
"""
