"""Tools for tests and benchmarks; the library itself never imports this package.

* :mod:`.comms`: counts the collectives a piece of code issues (kind, group, bytes).
* :mod:`.tiny_hf`: tiny random transformers models of every supported architecture.
* :mod:`.synthetic`: synthetic corpora of a given size.
* :mod:`.faults`: fault injection for the failure tests (``MULTITOKEN_FAULT``).
"""
