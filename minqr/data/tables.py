"""Columnar preference data: Parquet files, Arrow files, and the splits of `datasets` data sets.

These are read through pyarrow and `datasets`, the optional extra minqr[data]; without it, reading
one is a single MinqrError that says what to install (JSON lines need neither).

- a Parquet file;
- an Arrow IPC file, or an Arrow IPC stream: the `.arrow` files that `datasets` writes (its cache,
  `save_to_disk`) are streams;
- `hf:NAME` or `hf:NAME:SPLIT`: a data set that `datasets.load_dataset(NAME, SUBSET, split=SPLIT)`
  loads, from the Hugging Face hub (e.g. `hf:trl-lib/ultrafeedback_binarized`) or from a local
  folder of data files; its cache (HF_HOME) serves it offline once it has been loaded online.

Every source becomes rows `(origin, record)`: the record is a dict of the columns a pair needs
(those of them the table has), the origin "SOURCE:row N" names the row by its index N from 0, as
`dataset[N]` and pyarrow count (JSON lines are named by their line number from 1, as editors
count). minqr/data/pairs.py turns records into Pairs, the same way for every format.
"""
import importlib
from dataclasses import dataclass
from pathlib import Path

from minqr.errors import MinqrError
from minqr.reading import loads

HUB_PREFIX = "hf:"
# A file's format by its first bytes (Arrow streams start with the continuation marker 0xFFFFFFFF).
MAGIC = {b"PAR1": "Parquet", b"ARROW1": "Arrow IPC file", b"\xff\xff\xff\xff": "Arrow IPC stream"}
# Rows turned into Python objects at a time: big data sets are read without holding them twice.
ROWS_PER_BATCH = 1024


def require(module: str, what: str):
    """Import `module`, a part of the optional extra minqr[data], or stop with the one message that
    names the extra to install. `what` is what needed it, e.g. "reading x.parquet (Parquet)"."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MinqrError(f"{what} needs {module.partition('.')[0]}, which is not installed: install minqr's "
                         "optional extra for data files, pip install 'minqr[data]' (pyarrow and datasets)") from error


def columnar_format(path: Path) -> str | None:
    """The columnar format of a file, by its first bytes (its name does not matter); None for
    anything else (JSON lines, plain or gzipped)."""
    try:
        with open(path, "rb") as file:
            head = file.read(max(map(len, MAGIC)))
    except OSError as error:
        raise MinqrError(f"cannot read {path}: {error}") from error
    return next((name for magic, name in MAGIC.items() if head.startswith(magic)), None)


def file_rows(path: Path, file_format: str, columns):
    """(origin, record) of every row of a Parquet or Arrow file (`file_format` from columnar_format),
    keeping `columns` (those of them the file has)."""
    pa = require("pyarrow", f"reading {path} ({file_format})")
    try:
        if file_format == "Parquet":
            parquet = require("pyarrow.parquet", f"reading {path} ({file_format})").ParquetFile(path)
            present = [name for name in columns if name in parquet.schema_arrow.names]
            batches = parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=present)
        elif file_format == "Arrow IPC file":
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(pa.ipc.open_stream(pa.memory_map(str(path))))
        if file_format != "Parquet":
            # an Arrow file is memory-mapped as it is: an offset that points past its buffers would
            # be read from outside the file (a bus error, no message), so every batch is checked first
            batches = (_validated(batch) for batch in batches)
        yield from _rows(batches, str(path), columns)
    except (OSError, pa.ArrowException) as error:  # unreadable, truncated, or not what its first bytes say
        raise MinqrError(f"cannot read {path} as {file_format}: {error}") from error


@dataclass(frozen=True)
class HubSplit:
    """One split of a data set, loaded by `datasets` (see load_hub_split)."""

    label: str  # "hf:NAME:SPLIT", and the subset if one was given: what messages call it
    name: str
    split: str
    dataset: object  # a datasets.Dataset (Arrow tables in the datasets cache, memory-mapped)


def hub_name(source: str) -> tuple[str, str | None] | None:
    """(NAME, SPLIT or None) of a data name `hf:NAME` or `hf:NAME:SPLIT`; None for other sources.
    Everything after NAME's colon is the split, so that `datasets` slices work: hf:NAME:train[:1000]."""
    if not source.startswith(HUB_PREFIX):
        return None
    name, _, split = source[len(HUB_PREFIX):].partition(":")
    if not name:
        raise MinqrError(f"data {source!r} names no data set: hf:NAME or hf:NAME:SPLIT, e.g. "
                         "hf:trl-lib/ultrafeedback_binarized")
    return name, split or None


def load_hub_split(name: str, split: str, subset: str | None = None) -> HubSplit:
    """`datasets.load_dataset(name, subset, split=split)`: from the datasets cache, else downloaded
    (or prepared from a local folder of data files). Each way it cannot be had is one MinqrError."""
    label = f"{HUB_PREFIX}{name}:{split}" + (f" (subset {subset})" if subset else "")
    datasets = require("datasets", f"reading {label}")
    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except ConnectionError as error:  # offline (HF_HUB_OFFLINE) or the hub cannot be reached, and not cached
        raise MinqrError(
            f"cannot reach the Hugging Face hub for {label}, and the datasets cache (HF_HOME) does not hold it: "
            "run the same command once online, which fills the cache, and copy that cache here; or, online, "
            f"save the split as a file (datasets.load_dataset({name!r}, split={split!r}).to_parquet('pairs.parquet')) "
            "and pass that file as the data") from error
    except (datasets.exceptions.DatasetsError, FileNotFoundError, ValueError) as error:
        # no such data set, subset or split (the library's message names what there is), or files
        # that do not make one data set (splits with different columns, say)
        raise MinqrError(f"cannot load {label}: {error}") from error
    return HubSplit(label, name, split, dataset)


def hub_rows(source: HubSplit, columns):
    """(origin, record) of every row of a loaded split, keeping `columns` (those of them it has)."""
    dataset = source.dataset
    dataset = dataset.select_columns([name for name in columns if name in dataset.column_names])
    # a column of mixed types (a string here, a number there) is stored by datasets as JSON text,
    # which the Arrow rows hand out as it is ('"a"', '5'): decoded here, so that its values meet the
    # checks of minqr/data/pairs.py as they are (a text keeps no quotes, a number is refused)
    encoded = {name: feature for name, feature in dataset.features.items() if _holds_json(feature)}
    for origin, record in _rows(dataset.with_format("arrow").iter(batch_size=ROWS_PER_BATCH), source.label, columns):
        for name, feature in encoded.items():
            try:
                record[name] = _json_decoded(record.get(name), feature)
            except ValueError as error:
                raise MinqrError(f"{origin}: column {name!r} holds JSON text that does not parse ({error})") from None
        yield origin, record


def _inner(feature):
    """The feature of a datasets list feature's items (List, Sequence, or [feature]), else None."""
    return feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)


def _is_json(feature) -> bool:
    return type(feature).__name__ == "Json"  # datasets.Json, by name: datasets is an optional extra


def _holds_json(feature) -> bool:
    """Whether a datasets feature is, or holds at any depth (a message's content), a Json feature."""
    if _is_json(feature):
        return True
    if isinstance(feature, dict):
        return any(map(_holds_json, feature.values()))
    inner = _inner(feature)
    return inner is not None and _holds_json(inner)


def _json_decoded(value, feature):
    """`value` with the JSON text at the places `feature` marks Json parsed back into its values."""
    if _is_json(feature):
        return loads(value) if isinstance(value, str) else value
    if isinstance(feature, dict) and isinstance(value, dict):
        return {key: _json_decoded(item, feature[key]) if key in feature else item for key, item in value.items()}
    inner = _inner(feature)
    if inner is not None and isinstance(value, list):
        return [_json_decoded(item, inner) for item in value]
    return value


def _validated(batch):
    batch.validate(full=True)  # pyarrow.ArrowInvalid, naming what is wrong
    return batch


def _rows(batches, source: str, columns):
    """(f"{source}:row {n}", record) of the rows of pyarrow record batches or tables, n from 0."""
    number = 0
    for batch in batches:
        names = batch.schema.names
        twice = [name for name in columns if names.count(name) > 1]
        if twice:
            raise MinqrError(f"{source}: the column {twice[0]!r} appears {names.count(twice[0])} times: which one "
                             "holds the data is not clear; rename or drop the others")
        batch = batch.select([name for name in columns if name in names])
        for record in batch.to_pylist():
            yield f"{source}:row {number}", record
            number += 1
