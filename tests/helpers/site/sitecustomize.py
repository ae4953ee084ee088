"""Loaded at the start of every Python process the tests launch (``tests/conftest.py`` puts
this folder on ``PYTHONPATH``): a process started with ``MULTITOKEN_FAULT`` set gets the fault
actions installed (the launcher, its forkserver and every rank)."""

import os

if os.environ.get("MULTITOKEN_FAULT"):
    from multitoken.testing import faults

    faults.install()
