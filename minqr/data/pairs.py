r"""Preference pairs: where they come from, how they are read, what counts as bad data.

A preference pair is two texts, the response a human chose and the one they rejected, each with
the dialogue that led to it. minqr reads them from:

- a file, its format recognised by its content (not its name):
  - JSON lines, plain or gzipped, one object a line;
  - Parquet, or Arrow (an IPC file, or an IPC stream such as the `.arrow` files of `datasets`),
    one record a row (minqr/data/tables.py; these need the optional extra minqr[data]);
- a folder laid out like the public hh-rlhf repository: DIR/helpful-base/train.jsonl.gz,
  DIR/harmless-base/test.jsonl.gz, ... (a subset and a split pick the file);
- the name `hh-rlhf:SUBSET`, fetched through huggingface_hub (see minqr/hub.py);
- the name `hf:NAME` or `hf:NAME:SPLIT`, any data set that `datasets.load_dataset` loads (a subset
  is its configuration); minqr/data/tables.py.

Every format gives records with the same fields, in the layouts of TRL's preference data:
  - `chosen` and `rejected` hold whole dialogues (the "implicit prompt"): HH-RLHF text
    "\n\nHuman: ...\n\nAssistant: ...", or lists of messages that share all but their final
    message, the response;
  - a separate `prompt` (the "explicit prompt"), with `chosen` / `rejected` holding only the
    responses.
  Each of the three is a string or a list of {"role", "content"} messages; a message list is
  rendered in the HH style ("user" -> "\n\nHuman: ...", "assistant" -> "\n\nAssistant: ..."), and a
  pair's texts are prompt + response, so that one conversation given either way is the same Pair.
  A pair given as message lists throughout also keeps its messages (`Pair.conversation`): a
  tokenizer with a chat template renders those instead of the HH text (minqr/data/chat.py).
  - an optional `margin`, a number: how much the chosen response should beat the rejected one by,
    as in TRL (-log sigma(r_c - r_r - margin)) and OpenRLHF. In code it is the PAIR margin, not to
    be confused with the `paper` objective's hyper-parameter `margin`. Either every pair of a source
    has one, or none does.
  - an optional `annotator`, a string or an integer: who gave the label (PRISM's `user_id`, say;
    `annotator_field` reads another column as it). A pair labelled by several people is several
    rows, one a label. Either every pair of a source has an id, or none has, and a source's ids are
    all strings or all integers: a missing id or a 7 among "7"s is far likelier a join gone wrong
    than an anonymous label. The ids let minqr/distribution/personal.py learn each person's kind.

Bad data is an error that names the file and line (JSON lines, "FILE:LINE", from 1) or row
(tables, "FILE:row N", from 0 as `dataset[N]` counts), or, with `skip_bad=True`, is skipped and
counted; identical chosen/rejected pairs carry no preference and are always dropped and counted.
`LoadStats.summary()` is the line the CLIs print.

Tokenising, batching and the model-input layouts are in minqr/data/batching.py.
"""
import gzip
import json
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from minqr import hub
from minqr.data import tables
from minqr.data.tables import HubSplit
from minqr.errors import MinqrError
from minqr.reading import loads

SPEAKERS = {"user": "Human", "human": "Human", "assistant": "Assistant"}
ASSISTANT_TURN = "\n\nAssistant:"
HH_PREFIX = "hh-rlhf"
_MISSING = object()  # a field absent from the record (None is a value: JSON null)
# The fields a record may have; tables are read for these columns only.
FIELDS = ("prompt", "chosen", "rejected", "margin")
ANNOTATOR_FIELD = "annotator"  # the field of an annotator's id, unless annotator_field names another
SKIP_HINT = "Fix the line, or pass skip_bad=True (--skip-bad) to skip bad lines and count them."


@dataclass(frozen=True)
class Conversation:
    """A pair given as message lists: each side's whole conversation, prompt then response."""

    chosen: tuple  # of {"role", "content"} dicts
    rejected: tuple
    # messages of the prompt that both sides start with (an explicit prompt, or TRL's implicit one:
    # all but the final message); None when the histories differ, and each side's response is its
    # final message
    prompt_turns: int | None

    def response_turn(self, side: str) -> int:
        """The index of the `side` conversation's first response message."""
        return self.prompt_turns if self.prompt_turns is not None else len(getattr(self, side)) - 1


@dataclass(frozen=True)
class Pair:
    chosen: str  # the full text: dialogue + chosen response (message lists in the HH style)
    rejected: str
    origin: str  # "FILE:LINE", for messages about this pair
    # characters of the separate prompt that both texts start with (the prompt/chosen/rejected
    # layout); None for whole dialogues, whose final response follows their last assistant turn
    prompt_length: int | None = None
    # the data's `margin` (TRL's): the pairwise term is -log sigma(r_c - r_r - pair_margin); None: none
    pair_margin: float | None = None
    # the messages, when the data gave the pair as message lists throughout: what a chat template
    # renders instead of the texts above (minqr/data/chat.py). Pairs compare by their texts, as
    # before conversations were kept: the messages are the same content, structured.
    conversation: Conversation | None = field(default=None, compare=False)
    # who gave the label: a str or an int, as the data gave it; None: the data says not. Two rows
    # of one pair by two people are the same pair, labelled twice
    annotator: str | int | None = field(default=None, compare=False)

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


def load_pairs(source, split: str = "train", subset: str | None = None, skip_bad: bool = False,
               annotator_field: str | None = None) -> tuple[list[Pair], LoadStats]:
    """Read the pairs of `source` (a file, an hh-rlhf-like folder, `hh-rlhf:SUBSET` or `hf:NAME[:SPLIT]`).
    `annotator_field`: the field of the annotators' ids (default "annotator"; optional: pairs
    without it have none)."""
    return read_pairs(resolve_source(source, split, subset), skip_bad, annotator_field)


def resolve_source(source, split: str = "train", subset: str | None = None) -> Path | HubSplit:
    """The file that `source`, `split` and `subset` name (fetched if it is an hh-rlhf name), or the
    loaded split of an `hf:` data set (whose own SPLIT, if it names one, wins over `split`)."""
    text = str(source)
    hub_name = tables.hub_name(text)
    if hub_name is not None:
        name, named_split = hub_name
        return tables.load_hub_split(name, named_split or split, subset)
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
        raise MinqrError(f"no such data file or folder: {path}. Data is a .jsonl, .jsonl.gz, .parquet or .arrow "
                         "file, a folder laid out like hh-rlhf (DIR/SUBSET/SPLIT.jsonl.gz), hh-rlhf:SUBSET, "
                         "or hf:NAME[:SPLIT] (a data set that datasets.load_dataset loads)")
    folder = path / subset if subset else path
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    subsets = sorted(d.name for d in path.iterdir() if d.is_dir() and any(d.glob(f"{split}.jsonl*")))
    if subset or not subsets:
        raise MinqrError(f"no {split}.jsonl.gz or {split}.jsonl in {folder}"
                         + (f"; subsets with a {split} split there: {', '.join(subsets)}" if subsets else ""))
    raise MinqrError(f"{path} is a folder of subsets; pick one with subset (--subset): {', '.join(subsets)}")


def names_one_split(source) -> bool:
    """Whether `source` is data of one split only, a file or hf:NAME:SPLIT, as opposed to a folder,
    hh-rlhf:SUBSET or hf:NAME, whose other splits (the test split) a caller may read too."""
    hub_name = tables.hub_name(str(source))
    return hub_name[1] is not None if hub_name is not None else Path(source).expanduser().is_file()


def read_pairs(source: Path | HubSplit, skip_bad: bool = False,
               annotator_field: str | None = None) -> tuple[list[Pair], LoadStats]:
    """Read the pairs of a source as resolve_source gives it: a file, or a loaded `hf:` split."""
    if isinstance(source, HubSplit):
        rows = tables.hub_rows(source, _fields(annotator_field))
        return _read_rows(rows, source.label, _table_record, skip_bad, annotator_field)
    return read_pairs_file(source, skip_bad, annotator_field)


def read_pairs_file(path, skip_bad: bool = False, annotator_field: str | None = None) -> tuple[list[Pair], LoadStats]:
    """Read one file: Parquet or Arrow (tables.MAGIC), else JSON lines, plain or gzipped; each
    recognised by its content, not its name."""
    path = Path(path)
    file_format = tables.columnar_format(path)
    if file_format is None:
        return _read_rows(json_lines(path), str(path), json_record, skip_bad, annotator_field)
    rows = tables.file_rows(path, file_format, _fields(annotator_field))
    return _read_rows(rows, str(path), _table_record, skip_bad, annotator_field)


def _fields(annotator_field: str | None) -> tuple:
    """The fields a record is read for: FIELDS and the annotator's."""
    if annotator_field is not None and (annotator_field in FIELDS or not annotator_field):
        raise MinqrError(f"annotator_field (--annotator-field) {annotator_field!r} must name a field of its own, "
                         f"not one of {', '.join(FIELDS)}")
    return (*FIELDS, annotator_field or ANNOTATOR_FIELD)


def _read_rows(rows, source: str, parse, skip_bad: bool,
               annotator_field: str | None = None) -> tuple[list[Pair], LoadStats]:
    """The pairs of `rows`, (origin, raw) each, where `parse(raw, origin)` gives the record: what
    every format shares, from the record to the Pair, and the counts of what was dropped."""
    stats = LoadStats(source=source)
    pairs = []
    field_name = _fields(annotator_field)[-1]
    for origin, raw in rows:
        try:
            record = parse(raw, origin)
        except MinqrError as error:
            _skip_or_raise(error, skip_bad, stats, "malformed_lines")
            continue
        try:
            pair = _pair_from_record(record, origin, field_name)
        except MinqrError as error:
            _skip_or_raise(error, skip_bad, stats, "bad_fields")
            continue
        if pair.chosen == pair.rejected:
            stats.identical += 1
            continue
        pairs.append(pair)
    pairs = _with_consistent_annotators(pairs, field_name, skip_bad, stats)
    stats.pairs = len(pairs)
    if not pairs:
        raise MinqrError(f"no usable pairs in {source}: {stats.summary()}")
    check_margins(pairs, source)
    return pairs, stats


def render(value) -> str:
    """A prompt or response, string or list of {"role", "content"} messages, as HH-style text."""
    if isinstance(value, str):
        return value
    # HH-RLHF has no system turn: a system message (only ever the first) is the text before the
    # first "\n\nHuman:", as Anthropic's completion format placed it
    return "".join(m["content"] if m["role"] == "system" else f"\n\n{SPEAKERS[m['role']]}: {m['content']}"
                   for m in value)


MAX_LINE_BYTES = 64 * 1024 * 1024  # a record this long is no conversation: read no further than this


def json_lines(path: Path):
    """(f"{path}:{line number}", the line's bytes) of every line of a JSON-lines file, plain or
    gzipped, but blank lines (a trailing newline, say), which hold no record."""
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as lines:
            number = 0
            while raw := lines.readline(MAX_LINE_BYTES + 1):  # bounded: a gzip's one line can be gigabytes
                number += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise MinqrError(f"{path}:{number}: a line of more than {MAX_LINE_BYTES:,} bytes, which no record "
                                     "of preference data needs (is it a JSON-lines file?)")
                if raw.strip():
                    yield f"{path}:{number}", raw
    except (OSError, EOFError, zlib.error) as error:  # unreadable, or a truncated/corrupt gzip stream
        raise MinqrError(f"cannot read {path}: {error}") from error


def _table_record(row: dict, origin: str) -> dict:
    """A table's row is a record already: the parse of columnar formats (they cannot be malformed)."""
    return row


def json_record(raw: bytes, origin: str, holds: str = "chosen and rejected") -> dict:
    """The JSON object of one line of a JSON-lines file (`origin`: its "file:line"); a MinqrError
    that says where the line is broken, or what it holds instead of an object with `holds`."""
    try:
        record = loads(raw.rstrip(b"\r\n").decode("utf-8"))  # without its newline, a torn line ends where it ends
    except UnicodeDecodeError as error:
        raise MinqrError(f"{origin}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise MinqrError(f"{origin}: malformed JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(record, dict):
        raise MinqrError(f"{origin}: expected a JSON object with {holds}, got {type(record).__name__}")
    return record


def _pair_from_record(record: dict, origin: str, annotator_field: str = ANNOTATOR_FIELD) -> Pair:
    """The Pair of one record, whatever the format it came from (module docstring: the layouts)."""
    return replace(_texts_from_record(record, origin), annotator=_checked_annotator(record.get(annotator_field),
                                                                                    annotator_field, origin))


def _texts_from_record(record: dict, origin: str) -> Pair:
    """The Pair of one record's texts and margin."""
    prompt = record.get("prompt")
    prompt = None if prompt is None else checked_text(prompt, "prompt", origin, allow_empty=True, opens=True)
    chosen = checked_text(record.get("chosen", _MISSING), "chosen", origin, opens=prompt is None)
    rejected = checked_text(record.get("rejected", _MISSING), "rejected", origin, opens=prompt is None)
    pair_margin = _checked_margin(record.get("margin"), origin)
    conversation = _conversation(record.get("prompt"), record["chosen"], record["rejected"])
    if prompt is None:
        # TRL's implicit prompt, in conversations that share all but their final message: the
        # characters of the shared messages rendered (so the pair equals the one with that prompt
        # given explicitly). Anything else has its response after the last assistant turn
        # (Pair.response_start).
        shared = None if conversation is None else conversation.prompt_turns
        prompt_length = None if shared is None else len(render(record["chosen"][:shared]))
        return Pair(chosen, rejected, origin, prompt_length, pair_margin, conversation)
    return Pair(prompt + chosen, prompt + rejected, origin, len(prompt), pair_margin, conversation)


def _conversation(prompt, chosen, rejected) -> Conversation | None:
    """The pair as message lists, when the record gives it so throughout (no string anywhere)."""
    if not (isinstance(chosen, list) and isinstance(rejected, list) and isinstance(prompt, (list, type(None)))):
        return None
    if prompt is not None:
        return Conversation(tuple(prompt + chosen), tuple(prompt + rejected), len(prompt))
    shared = len(chosen) - 1 if chosen[:-1] == rejected[:-1] else None
    return Conversation(tuple(chosen), tuple(rejected), shared)


def _checked_margin(value, origin: str) -> float | None:
    """The pair margin as a float; None (absent, or null) for none."""
    if value is None:
        return None
    # `abs(value) <= max` is False for NaN, the infinities and integers too big for a float
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= sys.float_info.max:
        raise MinqrError(f"{origin}: field 'margin' must be a finite number (how much the chosen response should "
                         f"beat the rejected one by), not {value!r:.40} ({type(value).__name__})")
    return float(value)


def _checked_annotator(value, field_name: str, origin: str) -> str | int | None:
    """An annotator's id: a non-empty string or an integer; None (absent, or null) for none."""
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    what = "an empty string" if isinstance(value, str) else f"{value!r:.40} ({type(value).__name__})"
    raise MinqrError(f"{origin}: field {field_name!r} must be an annotator's id, a non-empty string or an integer, "
                     f"not {what}")


def _with_consistent_annotators(pairs: list, field_name: str, skip_bad: bool, stats: LoadStats) -> list:
    """The pairs, if every one has an id of one type (str or int) or none has one; otherwise the
    first that breaks the rule is an error, or with skip_bad every such pair is skipped and counted."""
    first = next((pair for pair in pairs if pair.annotator is not None), None)
    if first is None:
        return pairs
    kind = type(first.annotator)
    kept = []
    for pair in pairs:
        if isinstance(pair.annotator, kind):
            kept.append(pair)
            continue
        what = ("has no annotator id" if pair.annotator is None else
                f"has the {type(pair.annotator).__name__} id {pair.annotator!r:.40}")
        error = MinqrError(f"{pair.origin}: field {field_name!r}: this pair {what}, but {first.origin} has the "
                           f"{kind.__name__} id {first.annotator!r:.40}; give every pair an id, all strings or all "
                           "integers")
        _skip_or_raise(error, skip_bad, stats, "bad_fields")
    return kept


def check_annotators(pairs: list, source: str) -> None:
    """Every pair has an annotator id, all of one type, or none has one (pairs made by hand)."""
    _with_consistent_annotators(pairs, ANNOTATOR_FIELD, False, LoadStats(source))


def index_annotators(ids) -> tuple[tuple, list]:
    """(the distinct ids in order of first appearance, each given id's index into them)."""
    rows: dict = {}
    index = [rows.setdefault(annotator, len(rows)) for annotator in ids]
    return tuple(rows), index


def check_margins(pairs: list, source: str) -> None:
    """Either every pair has a margin or none has: a margin missing from some pairs is far likelier a
    mistake in the data (a misspelt field, a join gone wrong) than a margin of 0."""
    without = [pair for pair in pairs if pair.pair_margin is None]
    if 0 < len(without) < len(pairs):
        raise MinqrError(f"{source}: {len(pairs) - len(without):,} of {len(pairs):,} pairs have a margin and "
                         f"{len(without):,} have none (the first: {without[0].origin}): give every pair a margin "
                         "(0 for none), or none")


def checked_text(value, field: str, origin: str, allow_empty: bool = False, opens: bool = False) -> str:
    """The text of a field; a message list's roles are checked: a system message may open the
    conversation (`opens`: the prompt, or a whole dialogue) and is never the response itself."""
    if value is _MISSING:
        raise MinqrError(f"{origin}: missing field {field!r}")
    if isinstance(value, list):
        for k, message in enumerate(value):
            role = message.get("role") if isinstance(message, dict) else None
            opening = role == "system" and opens and k == 0 and (field == "prompt" or len(value) > 1)
            if not (isinstance(message, dict) and isinstance(message.get("content"), str)
                    and isinstance(role, str) and (role in SPEAKERS or opening)):
                raise MinqrError(f"{origin}: field {field!r} holds a message that is not {{\"role\": one of "
                                 f"{sorted(SPEAKERS)} (or \"system\", first, before the conversation), "
                                 f"\"content\": a string}}: {message!r:.80}")
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
