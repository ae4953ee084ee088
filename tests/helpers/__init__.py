"""What the tests share: one tiny model factory (``models``), one packed-batch builder
(``batches``), the distributed reference and its rank pool (``distributed``, ``rank_pool``),
the command-line runs (``cli``), and the data probe run as its own process (``data_probe``).

Importable as ``tests.helpers`` (``tests/__init__.py`` makes pytest put the repository root on
``sys.path``; the rank pool's forkserver inherits that path). Keep this file empty of imports:
the gloo ranks import these modules too.
"""
