"""The train/validation split: one rule, by a stable hash of each document's name.

A document goes to validation when ``unit_hash(name, seed) < val_fraction``: its side depends
only on its name and ``seed``, never on the other documents, so adding files to a corpus does
not move existing ones between the splits. With two or more documents and ``val_fraction > 0``
both splits are non-empty: when the hash sends none to validation, the document with the
smallest hash goes there (and symmetrically, the largest to train when all went to validation).

:class:`SplitRule` applies the rule to a stream of names (the token store builder, the
tokenizer's training sample), and :meth:`SplitRule.fixed_up` gives the rule of the second
pass that the small-corpus fix-up needs; :func:`split_documents` splits a list with the same
two passes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from multitoken.data.documents import Document
from multitoken.errors import DataError

__all__ = ["SplitRule", "check_val_fraction", "split_documents", "unit_hash"]


def unit_hash(name: str, seed: int) -> float:
    """A uniform number in [0, 1) from the name: the same in every process and run.

    Python's ``hash`` of a str is salted per process (PYTHONHASHSEED), so every rank
    and every restart would disagree on the split; a cryptographic hash does not.
    """
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def check_val_fraction(val_fraction: float) -> None:
    """Raises DataError unless ``val_fraction`` is in [0, 1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")


class SplitRule:
    """Train or validation per document name, in one pass over the corpus.

    Also records the documents with the smallest and the largest hash, for the small-corpus
    fix-up (:meth:`fixed_up`), and counts the names seen.

    Attributes:
        val_fraction, seed: The rule.
        force_val, force_train: A name sent to validation (train) whatever its hash.
        count: Names seen so far.
    """

    def __init__(
        self, val_fraction: float, seed: int, force_val: str = "", force_train: str = ""
    ) -> None:
        self.val_fraction, self.seed = val_fraction, seed
        self.force_val, self.force_train = force_val, force_train
        self.lowest: tuple[float, int, str] | None = None
        self.highest: tuple[float, int, str] | None = None
        self.count = 0

    def is_val(self, name: str) -> bool:
        """True when the document named ``name`` (the next one of the pass) is validation."""
        score = unit_hash(name, self.seed)
        key = (score, self.count, name)
        self.lowest = key if self.lowest is None or key < self.lowest else self.lowest
        # Ties go to the later document for "highest", as a stable sort would.
        self.highest = key if self.highest is None or key[0] >= self.highest[0] else self.highest
        self.count += 1
        if name == self.force_val:
            return True
        if name == self.force_train:
            return False
        return score < self.val_fraction

    def fixed_up(self, num_train: int, num_val: int) -> SplitRule | None:
        """The rule of a second pass when this pass left a split empty that must not be, else
        None (the split stands)."""
        if self.count < 2:
            return None
        if self.val_fraction > 0 and num_val == 0 and not self.force_val:
            return SplitRule(self.val_fraction, self.seed, self.lowest[2], self.force_train)
        if num_train == 0 and not self.force_train:
            return SplitRule(self.val_fraction, self.seed, self.force_val, self.highest[2])
        return None


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.02, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split documents into train and validation as the token store does (see the module).

    Args:
        docs: The corpus.
        val_fraction: Expected fraction of documents in the validation set, in [0, 1);
            0 means no validation set.
        seed: Changes which documents land in validation.

    Returns:
        ``(train, val)``, each in the corpus order.

    Raises:
        DataError: If the corpus is empty or ``val_fraction`` is outside [0, 1).
    """
    if not docs:
        raise DataError(
            "cannot split an empty corpus: pass --data a folder of text files or a .jsonl "
            "file with a 'text' field"
        )
    check_val_fraction(val_fraction)
    rule: SplitRule | None = SplitRule(val_fraction, seed)
    while rule is not None:
        in_val = [rule.is_val(doc.name) for doc in docs]
        rule = rule.fixed_up(in_val.count(False), in_val.count(True))
    train = [doc for doc, v in zip(docs, in_val) if not v]
    val = [doc for doc, v in zip(docs, in_val) if v]
    return train, val
