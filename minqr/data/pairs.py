"""Preference pairs: where they come from, how they are read, what counts as bad data.

A preference pair is two texts, the response a human chose and the one they rejected, each with
the dialogue that led to it. minqr reads them from:

- a JSON-lines file, plain or gzipped, one object a line, in one of two layouts:
  - `chosen` and `rejected` hold whole dialogues, the HH-RLHF form
    "\\n\\nHuman: ...\\n\\nAssistant: ...";
  - a separate `prompt`, with `chosen` / `rejected` holding only the responses (the layout TRL
    uses). Each of the three is a string or a list of {"role", "content"} messages; a message
    list is rendered in the HH style ("user" -> "\\n\\nHuman: ...", "assistant" ->
    "\\n\\nAssistant: ..."), and a pair's texts are prompt + response.
- a folder laid out like the public hh-rlhf repository: DIR/helpful-base/train.jsonl.gz,
  DIR/harmless-base/test.jsonl.gz, ... (a subset and a split pick the file);
- the name `hh-rlhf:SUBSET`, fetched through huggingface_hub (see minqr/hub.py).

Bad data is an error that names the file and line, or, with `skip_bad=True`, is skipped and
counted; identical chosen/rejected pairs carry no preference and are always dropped and counted.
`LoadStats.summary()` is the line the CLIs print.

Tokenising, batching and the model-input layouts are in minqr/data/batching.py.
"""
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from minqr import hub
from minqr.errors import MinqrError

SPEAKERS = {"user": "Human", "human": "Human", "assistant": "Assistant"}
ASSISTANT_TURN = "\n\nAssistant:"
HH_PREFIX = "hh-rlhf"
_MISSING = object()  # a field absent from the record (None is a value: JSON null)
SKIP_HINT = "Fix the line, or pass skip_bad=True (--skip-bad) to skip bad lines and count them."


@dataclass(frozen=True)
class Pair:
    chosen: str  # the full text the model reads: dialogue + chosen response
    rejected: str
    origin: str  # "FILE:LINE", for messages about this pair
    # characters of the separate prompt that both texts start with (the prompt/chosen/rejected
    # layout); None for whole dialogues, whose final response follows their last assistant turn
    prompt_length: int | None = None

    def response_start(self, side: str) -> int:
        """Where the `side` ("chosen" or "rejected") text's final response starts, in characters:
        after the prompt when the data gave one, else after the dialogue's last "\n\nAssistant:"
        (0, the whole text, when it has none)."""
        if self.prompt_length is not None:
            return self.prompt_length
        text = getattr(self, side)
        turn = text.rfind(ASSISTANT_TURN)
        return 0 if turn < 0 else turn + len(ASSISTANT_TURN)


@dataclass
class LoadStats:
    source: str
    pairs: int = 0
    malformed_lines: int = 0  # not JSON, not UTF-8, or not a JSON object (skipped with skip_bad)
    bad_fields: int = 0  # chosen/rejected/prompt missing, of the wrong type, empty or not text (skipped)
    identical: int = 0  # chosen == rejected: no preference to learn (always dropped)
    first_skipped: str = ""  # the message of the first skipped line, to show the user

    def summary(self) -> str:
        line = (f"{self.pairs:,} pairs from {self.source}; dropped {self.identical:,} identical, "
                f"skipped {self.malformed_lines:,} malformed lines and {self.bad_fields:,} with bad fields")
        return line + (f" (first: {self.first_skipped})" if self.first_skipped else "")


def load_pairs(source, split: str = "train", subset: str | None = None,
               skip_bad: bool = False) -> tuple[list[Pair], LoadStats]:
    """Read the pairs of `source` (a file, an hh-rlhf-like folder, or `hh-rlhf:SUBSET`)."""
    return read_pairs_file(resolve_source(source, split, subset), skip_bad)


def resolve_source(source, split: str = "train", subset: str | None = None) -> Path:
    """The JSON-lines file that `source`, `split` and `subset` name (fetched if it is a hub name)."""
    text = str(source)
    if text == HH_PREFIX or text.startswith(HH_PREFIX + ":"):
        named = text.partition(":")[2] or None
        if named and subset and named != subset:
            raise MinqrError(f"data {text!r} names subset {named!r} but subset {subset!r} was also given")
        if not (named or subset):
            raise MinqrError(f"data {text!r} needs a subset: hh-rlhf:SUBSET, one of {', '.join(hub.HH_RLHF_SUBSETS)}")
        return hub.fetch_hh_rlhf(named or subset, split)
    path = Path(source).expanduser()
    if path.is_file():
        if subset:
            raise MinqrError(f"subset {subset!r} applies to folders, but {path} is a file; drop the subset")
        return path
    if not path.is_dir():
        raise MinqrError(f"no such data file or folder: {path}. Data is a .jsonl or .jsonl.gz file, a "
                         "folder laid out like hh-rlhf (DIR/SUBSET/SPLIT.jsonl.gz), or hh-rlhf:SUBSET")
    folder = path / subset if subset else path
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    subsets = sorted(d.name for d in path.iterdir() if d.is_dir() and any(d.glob(f"{split}.jsonl*")))
    if subset or not subsets:
        raise MinqrError(f"no {split}.jsonl.gz or {split}.jsonl in {folder}"
                         + (f"; subsets with a {split} split there: {', '.join(subsets)}" if subsets else ""))
    raise MinqrError(f"{path} is a folder of subsets; pick one with subset (--subset): {', '.join(subsets)}")


def read_pairs_file(path, skip_bad: bool = False) -> tuple[list[Pair], LoadStats]:
    """Read one JSON-lines file, plain or gzipped (recognised by its content, not its name)."""
    path = Path(path)
    stats = LoadStats(source=str(path))
    pairs = []
    for number, raw in enumerate(_read_lines(path), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline, say) hold no record
        origin = f"{path}:{number}"
        try:
            record = _parse_line(raw, origin)
        except MinqrError as error:
            _skip_or_raise(error, skip_bad, stats, "malformed_lines")
            continue
        try:
            pair = _pair_from_record(record, origin)
        except MinqrError as error:
            _skip_or_raise(error, skip_bad, stats, "bad_fields")
            continue
        if pair.chosen == pair.rejected:
            stats.identical += 1
            continue
        pairs.append(pair)
    stats.pairs = len(pairs)
    if not pairs:
        raise MinqrError(f"no usable pairs in {path}: {stats.summary()}")
    return pairs, stats


def render(value) -> str:
    """A prompt or response, string or list of {"role", "content"} messages, as HH-style text."""
    if isinstance(value, str):
        return value
    return "".join(f"\n\n{SPEAKERS[m['role']]}: {m['content']}" for m in value)


def _read_lines(path: Path):
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as lines:
            yield from lines
    except (OSError, EOFError, zlib.error) as error:  # unreadable, or a truncated/corrupt gzip stream
        raise MinqrError(f"cannot read {path}: {error}") from error


def _parse_line(raw: bytes, origin: str) -> dict:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise MinqrError(f"{origin}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise MinqrError(f"{origin}: malformed JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(record, dict):
        raise MinqrError(f"{origin}: expected a JSON object with chosen and rejected, got {type(record).__name__}")
    return record


def _pair_from_record(record: dict, origin: str) -> Pair:
    prompt = record.get("prompt")
    prompt = None if prompt is None else _checked_text(prompt, "prompt", origin, allow_empty=True)
    chosen = _checked_text(record.get("chosen", _MISSING), "chosen", origin)
    rejected = _checked_text(record.get("rejected", _MISSING), "rejected", origin)
    if prompt is None:
        return Pair(chosen, rejected, origin)
    return Pair(prompt + chosen, prompt + rejected, origin, prompt_length=len(prompt))


def _checked_text(value, field: str, origin: str, allow_empty: bool = False) -> str:
    if value is _MISSING:
        raise MinqrError(f"{origin}: missing field {field!r}")
    if isinstance(value, list):
        for message in value:
            if not (isinstance(message, dict) and isinstance(message.get("content"), str)
                    and isinstance(message.get("role"), str) and message["role"] in SPEAKERS):
                raise MinqrError(f"{origin}: field {field!r} holds a message that is not "
                                 f"{{\"role\": one of {sorted(SPEAKERS)}, \"content\": a string}}: {message!r:.80}")
    elif not isinstance(value, str):
        raise MinqrError(f"{origin}: field {field!r} must be a string or a list of "
                         f"{{role, content}} messages, not {type(value).__name__}")
    text = render(value)
    if not allow_empty and not text.strip():
        raise MinqrError(f"{origin}: field {field!r} is empty")
    check_encodable(text, f"{origin}: field {field!r}")
    return text


def check_encodable(text: str, what: str) -> None:
    """A MinqrError, starting with `what`, for a text that is not UTF-8 encodable. JSON's "\\ud83d"
    escapes can make such a string (a lone surrogate), and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise MinqrError(f"{what} holds a lone surrogate {text[error.start]!r} at character {error.start}: half of a "
                         "UTF-16 pair (an emoji cut in two?), no character, and no tokenizer takes it") from None


def _skip_or_raise(error: MinqrError, skip_bad: bool, stats: LoadStats, counter: str) -> None:
    if not skip_bad:
        raise MinqrError(f"{error}. {SKIP_HINT}") from error
    setattr(stats, counter, getattr(stats, counter) + 1)
    stats.first_skipped = stats.first_skipped or str(error)
