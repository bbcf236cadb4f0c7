"""Reading files whose content minqr does not control: JSON of bounded depth, and .npz archives
without pickle.

Every JSON that minqr reads (data lines, scores files, config files, model folders, metrics, locks)
goes through `loads`. Python's parser recurses once a nesting level, so a line of 100,000 `[`
ends in a RecursionError, far from the file and line at fault. `loads` refuses anything nested
deeper than MAX_JSON_DEPTH levels (real records nest a handful: a list of messages, each a
mapping) with a `json.JSONDecodeError`, the error every caller already turns into "FILE:LINE:
malformed JSON" (and that `--skip-bad` skips); so is an object that gives a key twice, of which
Python's parser keeps the last without a word.

`read_npz` gives the arrays of a .npz file, or a MinqrError naming the file: never numpy's own
message, which suggests loading an untrusted file with `allow_pickle`, the way to run its code.
`is_finite_number` is what a number read from JSON must be to stand for one.
"""
import json
import math
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from minqr.errors import MinqrError

MAX_JSON_DEPTH = 100
# a JSON string (its escapes included) or one bracket: the tokens that decide the depth. A string
# left open runs to the end of the text: were it to fail instead, the scan would try again at every
# quote inside it (each `\"`), reading the rest of the text each time (quadratic: hours for a line
# of megabytes)
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
ZIP_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"


def loads(text: str | bytes):
    """json.loads, refusing nesting deeper than MAX_JSON_DEPTH with a json.JSONDecodeError at the
    first bracket too deep, and an integer too long for Python to read with one too (bytes must be
    UTF-8: a UnicodeDecodeError otherwise, as json.loads)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    too_deep = _first_too_deep(text)
    if too_deep is not None:
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", text, too_deep)
    try:
        return json.loads(text, object_pairs_hook=_mapping)
    except RecursionError:  # a caller already deep in its own stack: still an error about the text
        raise json.JSONDecodeError("nested too deep to parse", text, 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError as error:  # an integer of more than 4,300 digits (Python's limit): bad text too
        raise json.JSONDecodeError(str(error).split(";")[0], text, 0) from None


def is_finite_number(value) -> bool:
    """Whether a value read from JSON is a number that a float holds: an int or a float, not a bool
    (an int in Python), not NaN or an infinity, not an int too large for a float (10**400 is valid
    JSON, and math.isfinite and numpy raise OverflowError on it)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def first_repeated(items):
    """The first of `items` (hashable) that an earlier one equals, or None when they are distinct."""
    seen = set()
    return next((item for item in items if item in seen or seen.add(item)), None)


def _mapping(pairs: list) -> dict:
    """A JSON object as a dict, refusing a key given twice (json.loads would keep the last one
    without a word: `{"chosen": A, "chosen": B}` is no pair anyone meant)."""
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        raise ValueError(f"the key {first_repeated(key for key, _ in pairs)!r} is given twice in one object")
    return mapping


def _first_too_deep(text: str) -> int | None:
    """The position of the first bracket deeper than MAX_JSON_DEPTH, None if there is none."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:  # most texts: no scan needed
        return None
    depth = 0
    for token in _STRING_OR_BRACKET.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return token.start()
        elif bracket in "]}":
            depth -= 1
    return None


def read_npz(path, what: str, names=None) -> dict:
    """{name: array} of the arrays `names` (every array when None) that the .npz file `path` holds.
    `what` says what the file should be (e.g. "a minqr scores file") in the error, which names the
    path and never suggests pickle. Each array's header is read first: one that declares more data
    than its member holds (a shape of 10**12 in a file of a kilobyte) is refused before anything is
    allocated, and arrays not asked for are never decompressed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as error:
        raise MinqrError(f"{path} cannot be read ({error.strerror}): it should be {what}") from None
    if not head:
        raise MinqrError(f"{path} is empty (0 bytes), not {what}: was it cut short?")
    if head.startswith(NPY_MAGIC):
        raise MinqrError(f"{path} is a .npy file (one bare array), not {what}, a .npz archive of named arrays")
    if not head.startswith(ZIP_MAGIC):
        raise MinqrError(f"{path} is not a .npz archive (a zip file), so not {what}")
    arrays, name = {}, None
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            for name, info in members.items():
                if names is None or name in names:
                    _check_header(archive, info, name, path, what)
        with np.load(path, allow_pickle=False) as archive:
            for name in archive.files:
                if names is None or name in names:
                    arrays[name] = archive[name]
    except MinqrError:
        raise
    except ValueError:  # numpy's refusal of a pickled (object) array, or a malformed member
        raise MinqrError(f"{path}: its array {name!r} is malformed or holds Python objects, which only pickle "
                         f"could read (minqr never unpickles a file); it is not {what}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise MinqrError(f"{path} is a damaged .npz archive ({type(error).__name__}: {error}), not {what}") from None
    return arrays


def _check_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, path: Path, what: str) -> None:
    """The member's .npy header declares no more bytes than the member holds (a ValueError for a
    header numpy cannot read, as np.load's)."""
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(member)
        held = info.file_size - member.tell()
    declared = math.prod(shape) * dtype.itemsize
    if declared > held and not dtype.hasobject:  # (objects are pickled: np.load refuses them, named below)
        raise MinqrError(f"{path}: its array {name!r} declares {dtype} of shape {list(shape)} ({declared:,} bytes) "
                         f"but holds {held:,} bytes: it is damaged, not {what}")
