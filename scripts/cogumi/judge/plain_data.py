"""Plain data across the code judge's process boundary, and the framing of its messages.

The candidate's program and the trusted test runner are two processes; everything between them is JSON, so a
value that arrives is built by json.loads from exact int/float/bool/str/None/list, and tagged objects for the
rest: tuple, set, frozenset, dict (any plain keys), bytes, complex, and ints too long for a decimal string.
No object of the candidate's, and no method of one (`__eq__`), ever reaches the tests.
`to_plain` also converts numpy scalars and arrays (`tolist`, whose result is checked again), as HumanEval's own
harness compares them by value; anything else is refused (NotPlain).

This file is imported by the judge's tests and embedded, as source, into both harness programs
(sandbox_harness.py): the candidate's `python -I` sees no repository files.
"""

import json
import os

MAX_DEPTH = 100
MAX_MESSAGE = 64 << 20
PLAIN_TYPES = "int, float, str, list, dict, ..."


class NotPlain(Exception):
    """What a value is instead of plain data: 'an object of type Yes'."""


def to_plain(value, depth=0, ref_of=None):
    """A JSON-ready tree for `value`, or NotPlain. Exact types only: a subclass of int is not an int here.

    ref_of(value): the handle of an object that stays in the candidate's process (an instance of a class the tests
    constructed, MBPP's tree `Node`), or None; such an object crosses as {"t": "ref", "v": handle}.
    """
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        return value if value.bit_length() < 4000 else {"t": "int", "v": hex(value)}
    if ref_of is not None:
        handle = ref_of(value)
        if handle is not None:
            return {"t": "ref", "v": handle}
    if depth > MAX_DEPTH:
        raise NotPlain(f"data nested more than {MAX_DEPTH} deep (or a cycle)")
    if kind is list:
        return [to_plain(item, depth + 1, ref_of) for item in value]
    if kind is tuple or kind is set or kind is frozenset:
        return {"t": kind.__name__, "v": [to_plain(item, depth + 1, ref_of) for item in value]}
    if kind.__name__ in ("dict", "Counter", "OrderedDict", "defaultdict") and isinstance(value, dict) and (
            kind is dict or kind.__module__ == "collections"):
        return {"t": "dict", "v": [[to_plain(k, depth + 1, ref_of), to_plain(v, depth + 1, ref_of)]
                                   for k, v in dict.items(value)]}
    if kind is bytes:
        return {"t": "bytes", "v": value.hex()}
    if kind is complex:
        return {"t": "complex", "v": [value.real, value.imag]}
    if kind.__module__ == "numpy" and hasattr(value, "tolist"):  # numpy.float64, numpy.ndarray, numpy.bool_
        return to_plain(value.tolist(), depth + 1, ref_of)
    raise NotPlain(f"an object of type {kind.__name__}")


_BUILD = {"tuple": tuple, "set": set, "frozenset": frozenset, "dict": dict, "bytes": bytes.fromhex,
          "complex": lambda v: complex(*v), "int": lambda v: int(v, 16)}
_SHAPE = {"tuple": list, "set": list, "frozenset": list, "dict": list, "bytes": str, "complex": list, "int": str}


def _tagged(pairs, make_ref):
    if len(pairs) != 2 or pairs[0][0] != "t" or pairs[1][0] != "v":
        raise ValueError("not a tagged plain value")
    tag, v = pairs[0][1], pairs[1][1]
    if tag == "ref" and make_ref is not None and type(v) is int:
        return make_ref(v)
    if tag not in _BUILD:
        raise ValueError(f"not a plain value: {str(tag)[:20]}")
    if type(v) is not _SHAPE[tag] or (tag == "complex" and (len(v) != 2 or not all(type(x) is float for x in v))):
        raise ValueError(f"a malformed {tag}")
    if tag == "dict" and not all(type(kv) is list and len(kv) == 2 for kv in v):
        raise ValueError("a malformed dict")
    return _BUILD[tag](v)


def encode_tree(tree) -> bytes:
    """One framed message from a tree to_plain made (or a list of such trees and str)."""
    body = json.dumps(tree, ensure_ascii=True, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


def _read_exactly(fd, size):
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send(fd, message) -> None:
    send_tree(fd, to_plain(message))


def send_tree(fd, tree) -> None:
    data = memoryview(encode_tree(tree))
    while data:
        data = data[os.write(fd, data):]


def receive(fd, make_ref=None):
    """The next message, or None when the other side is gone; ValueError for anything but plain data.
    make_ref(handle): what a {"t": "ref"} becomes on this side (refused when None)."""
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes (over {MAX_MESSAGE})")
    body = _read_exactly(fd, size)
    if body is None:
        return None
    return json.loads(body, object_pairs_hook=lambda pairs: _tagged(pairs, make_ref))
