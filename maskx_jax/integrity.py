"""Content hashes of saved arrays: what every checkpoint this project writes records, and every load checks.

A checkpoint whose bytes were damaged on disk or in a copy can still load (orbax reads a flipped byte in a
data file as a different number), and the model then gives silently wrong answers. So every save records, per
array, ``sha256(dtype, shape, bytes)`` (:func:`digest`) beside the arrays and in the same atomic write, and
every load compares the arrays it read with them before any is used (:func:`check`). A file cut short or gone
makes the read itself fail; :func:`read_error` turns that into the same kind of error, naming the array.

Checkpoints written before hashes existed load with a one-line notice that they are unverified; the check
can be skipped on purpose (``verify=False`` in the loaders, ``--skip-checksums`` on the command lines,
``train.verify_checkpoints=False``), which is logged.
"""
from __future__ import annotations

import hashlib
import logging
import re
from typing import Any, Mapping

import numpy as np

log = logging.getLogger("maskx_jax.integrity")

KEY = "digests"  # where a checkpoint's metadata holds {array name: digest}


class CorruptCheckpointError(ValueError):
    """A checkpoint's arrays are not the ones that were saved (damaged, cut short or missing files)."""


def digest(array: Any) -> str:
    """``"sha256:<hex>"`` of an array's dtype, shape and C-order bytes."""
    a = np.ascontiguousarray(np.asarray(array))
    h = hashlib.sha256(f"{a.dtype.str}|{','.join(map(str, a.shape))}|".encode())
    h.update(memoryview(a).cast("B") if a.size else b"")
    return "sha256:" + h.hexdigest()


def digests(named: Mapping[str, Any]) -> dict[str, str]:
    """{name: :func:`digest`} for a flat {name: array} mapping."""
    return {name: digest(a) for name, a in named.items()}


def check(named: Mapping[str, Any], recorded: Mapping[str, str] | None, where: str, *, verify: bool = True) -> bool:
    """Compare the arrays read from ``where`` with the digests recorded when it was saved.

    Returns True when every array was verified, False when nothing could be (no digests recorded: a checkpoint
    from before they existed) or the check was skipped (``verify=False``), both logged in one line.
    Raises:
      CorruptCheckpointError: an array whose content differs, or one missing or unexpected, each named.
    """
    if not verify:
        log.warning("%s: content hashes NOT checked (skipped on request)", where)
        return False
    if recorded is None:
        log.warning("%s: written before content hashes were recorded; loaded unverified", where)
        return False
    bad = [name for name, a in named.items() if name in recorded and digest(a) != recorded[name]]
    missing = sorted(set(recorded) - set(named))
    extra = sorted(set(named) - set(recorded))
    if bad or missing or extra:
        lines = [f"{where} is damaged: its arrays are not the ones that were saved; refusing to use it."]
        if bad:
            lines.append(f"{len(bad)} array(s) whose content differs from the recorded hash: {', '.join(bad[:10])}"
                         + (" ..." if len(bad) > 10 else ""))
        if missing:
            lines.append(f"recorded but not read: {', '.join(missing[:10])}")
        if extra:
            lines.append(f"read but never recorded: {', '.join(extra[:10])}")
        raise CorruptCheckpointError("\n".join(lines))
    return True


_ORBAX_KEY = re.compile(r'Error reading "([^"/]+)')


def read_error(error: BaseException, where: str) -> CorruptCheckpointError:
    """The error to raise when reading ``where`` failed (a file cut short or missing): names the array.

    orbax wraps tensorstore's error (which names the array's key) in others: the whole chain is searched.
    """
    chain, seen = [], set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        text = str(e)
        match = _ORBAX_KEY.search(text)
        if match:
            first = text.strip().splitlines()[0]
            return CorruptCheckpointError(f"{where} is damaged: array {match.group(1)} could not be read "
                                          f"({first[:300]}); refusing to use it.")
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return CorruptCheckpointError(f"{where} is damaged: its arrays could not be read ({first[:300]}); "
                                  f"refusing to use it.")
