"""The scores file: a reward model's outputs on every pair of a test set, and what made them.

`tools/score.py` writes one file per model x split; `tools/analyze.py` reads any number of them.
Two layouts, picked by the file name:

- `.npz` (the default): float32 arrays `chosen` and `rejected`, shape [P, N] (P pairs, N raw
  outputs: N=1 for a scalar head; for a quantile head the outputs that the `readout` turns into
  the N quantiles q_0 <= ... <= q_{N-1}), optionally `anchor` [P, N] (the outputs for the pair's
  anchor, a reply whose true reward is 0 for everyone: the synthetic task has one), and
  `metadata`, a JSON string (numpy string array, so no pickle is ever needed to read it).
  When the rows have annotators the model knows (minqr/distribution/personal.py), also the personal
  arrays, NaN in the rows of no known annotator: `personal_probability` [P], their P(chosen ≻
  rejected); `personal_posterior` [P, N], their posterior over the kinds; `personal_reward` [P, 2],
  their expected reward of (chosen, rejected) relative to the metadata's `personal_reference`.
- `.jsonl`: the metadata object on the first line, then one line a pair,
  {"chosen": [N numbers], "rejected": [N numbers]} (and "anchor": [N numbers], and each personal
  array's row, null for NaN), for tools that do not read numpy.

Row p of both arrays is pair p of the data file, in the file's order (so that a truth file or a
second model's scores line up pair by pair).

Metadata keys (the writer gives the first group, save_scores fills in the second):

    model          str   the reward model folder or hub name
    head           str   "scalar" or "quantile"
    data           str   the data source (file, folder or hh-rlhf:SUBSET)
    split          str   "test", "train", ...
    workload       str   the row label of the report's table, e.g. "harmless-base test"
    taus           list  the N quantile levels tau_i; required for a quantile head, null for scalar
    readout        str   optional: how the outputs become quantiles, "raw" (they are the
                         quantiles, the default) or "sorted" (minqr/objectives/'s mixture objective)
    objective      str   optional: the objective the model was trained by
    options        dict  how the scores were made (max_length, shared_prefix, dtype, ...); optional
    label          str   optional column label for the report (default "scalar" / "OBJECTIVE N=10")
    truth          str   optional: the synthetic task's truth file for this data (a relative path
                         is relative to the scores file's folder)

    format         str   "minqr-scores/1"
    num_quantiles  int   N, from the arrays
    minqr_version  str   the minqr that wrote the file

Other keys are kept as they are.
"""
import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minqr import __version__
from minqr.atomic import atomic_file
from minqr.errors import MinqrError
from minqr.objectives.pair_models import KINDS, PAIR_MODELS, pair_model
from minqr.reading import is_finite_number, loads, read_npz

FORMAT = "minqr-scores/1"
FORMAT_FAMILY = "minqr-scores/"
HEADS = ("scalar", "quantile")
READOUTS = ("raw", "sorted")  # minqr/objectives/'s Objective.readout
WRITER_KEYS = ("model", "head", "data", "split", "workload")
HOW_TO_MAKE = "scores files are written by minqr score (in Python: minqr.study.scores_file.save_scores)"
# the personal arrays (module docstring) and the shape of each row: N values, one, or (chosen, rejected)
PERSONAL = {"personal_posterior": "N", "personal_probability": None, "personal_reward": 2}


@dataclass
class Scores:
    """One model's outputs on one data split; checked on construction."""

    chosen: np.ndarray  # [P, N] float32, the raw outputs
    rejected: np.ndarray  # [P, N] float32
    metadata: dict
    source: str = "scores"  # where it came from, for messages: the file path when read from disk
    anchor: np.ndarray | None = None  # [P, N] float32: the outputs for each pair's anchor reply, if any
    personal: dict = field(default_factory=dict)  # the PERSONAL arrays, float32, when the rows have annotators

    def __post_init__(self):
        _check(self)

    @property
    def num_pairs(self) -> int:
        return self.chosen.shape[0]

    @property
    def num_quantiles(self) -> int:
        return self.chosen.shape[1]

    @property
    def head(self) -> str:
        return self.metadata["head"]

    @property
    def taus(self) -> np.ndarray | None:
        """The quantile levels [N], or None for a scalar head (its one output is not a quantile)."""
        taus = self.metadata.get("taus")
        return None if taus is None else np.asarray(taus, dtype=np.float64)

    @property
    def readout(self) -> str:
        return self.metadata.get("readout", "raw")

    def quantiles(self, side: str, anchored: bool | None = None) -> np.ndarray:
        """[P, N] float64: the `side` ("chosen" or "rejected") responses' outputs read out as
        quantiles (sorted, for the readout "sorted"; the mean is unchanged).

        anchored: subtract what the model gives the pair's anchor reply, a reference reply to the
        same prompt (the synthetic task's, or `score --anchor-reply`'s): output by output for a head
        whose outputs are kinds of annotator (each kind has its own free constant; the pair model
        "kinds", minqr/objectives/pair_models.py), the anchor's mean otherwise (one constant for the
        whole head), as minqr/distribution/statistics.py reads a reference. The quantiles are then those of
        the reward relative to the anchor's, which for the synthetic task's anchor (worth 0 to
        everyone) is the reward itself. anchored=False reads the raw outputs, constants included.
        The default is anchored when the scores have anchor outputs; without them, N > 1 outputs
        need anchored=False said explicitly (a scalar head's one output needs no anchor)."""
        outputs = getattr(self, side).astype(np.float64)
        if anchored is None:
            anchored = self.anchor is not None
            if not anchored and self.num_quantiles > 1:
                raise MinqrError(f"{self.source}: no anchor outputs, so no reference to read the {side} quantiles "
                                 "relative to: score with --anchor-reply TEXT (a reply to every prompt), or read "
                                 "the raw outputs with anchored=False (each kind's free constant included)")
        if anchored:
            if self.anchor is None:
                raise MinqrError(f"{self.source}: no anchor outputs to align on: score with --anchor-reply TEXT (the "
                                 "synthetic task's scores have them already)")
            anchor = self.anchor.astype(np.float64)
            outputs = outputs - (anchor if self.has_kinds else anchor.mean(axis=1, keepdims=True))
        return np.sort(outputs, axis=1) if self.readout == "sorted" else outputs

    @property
    def has_kinds(self) -> bool:
        """Whether the outputs are kinds of annotator, each with a free constant of its own (the pair
        model "kinds", minqr/objectives/pair_models.py), whose quantiles mean something only relative
        to a reference. The objective is optional in the format: without it, a sorted read-out is a
        mixture's."""
        objective = self.metadata.get("objective") or ("mixture" if self.readout == "sorted" else "paper")
        return self.num_quantiles > 1 and pair_model(objective) == KINDS

    @property
    def workload(self) -> str:
        return self.metadata["workload"]

    @property
    def label(self) -> str:
        """The model's name in tables and legends."""
        kind = self.metadata.get("objective") or "quantile"  # the objective is optional in the format
        default = "scalar" if self.head == "scalar" else f"{kind} N={self.num_quantiles}"
        return self.metadata.get("label") or default

    @property
    def truth_path(self) -> Path | None:
        truth = self.metadata.get("truth")
        if not truth:
            return None
        path = Path(truth)
        if path.is_absolute() or self.source == "scores":
            return path
        return Path(self.source).parent / path


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, hex: what a scores file records of its truth file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_scores(path, chosen, rejected, metadata: dict, anchor=None, personal: dict | None = None) -> Path:
    """Write `chosen` and `rejected` ([P, N]), `anchor` ([P, N], optional), the `personal` arrays
    (PERSONAL's, optional) and `metadata` to `path` (.npz or .jsonl), atomically."""
    path = Path(path)
    layout = _layout(path)
    chosen, rejected = np.asarray(chosen), np.asarray(rejected)  # Scores checks them and makes them float32
    anchor = None if anchor is None else np.asarray(anchor)
    metadata = dict(metadata)
    if "format" in metadata and metadata["format"] != FORMAT:
        raise MinqrError(f"metadata format {metadata['format']!r} for {path}: save_scores writes {FORMAT}; drop the key")
    metadata["format"] = FORMAT
    metadata.setdefault("num_quantiles", chosen.shape[-1] if chosen.ndim else 0)
    metadata.setdefault("minqr_version", __version__)
    personal = {name: np.asarray(array) for name, array in (personal or {}).items()}
    scores = Scores(chosen, rejected, metadata, source=str(path), anchor=anchor, personal=personal)
    try:
        metadata_json = json.dumps(metadata)
    except TypeError as error:  # a Path, a numpy number, ...: the file must read back without minqr
        raise MinqrError(f"metadata for {path} must hold only JSON values (str, number, list, dict): {error}") from None
    with atomic_file(path) as tmp:
        if layout == "npz":
            anchors = {} if scores.anchor is None else {"anchor": scores.anchor}
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(f, chosen=scores.chosen, rejected=scores.rejected, metadata=np.array(metadata_json),
                         **anchors, **scores.personal)
        else:
            with open(tmp, "w") as f:
                f.write(metadata_json + "\n")
                anchors = [None] * scores.num_pairs if scores.anchor is None else scores.anchor.tolist()
                # JSON has no NaN: a row without a value is null
                personal = {name: [None if np.isnan(row).any() else row.tolist() for row in array]
                            for name, array in scores.personal.items()}
                for p, (c, r, a) in enumerate(zip(scores.chosen.tolist(), scores.rejected.tolist(), anchors)):
                    extra = ({} if a is None else {"anchor": a}) | {name: rows[p] for name, rows in personal.items()}
                    f.write(json.dumps({"chosen": c, "rejected": r} | extra) + "\n")
    return path


def load_scores(path) -> Scores:
    """Read a scores file written by save_scores; a MinqrError says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise MinqrError(f"scores file {path} does not exist; {HOW_TO_MAKE}")
    if _layout(path) == "npz":
        chosen, rejected, anchor, metadata, personal = _read_npz(path)
    else:
        chosen, rejected, anchor, metadata, personal = _read_jsonl(path)
    normalized = metadata.get("normalized")
    if normalized is not None:
        # `score --normalize` wrote (output - mean) / std; the analysis reads the model's own
        # outputs, in whose units its probabilities σ(r_c - r_r) and the truth's rewards are
        mean, std = _normalization(normalized, path)
        chosen, rejected = chosen * std + mean, rejected * std + mean
        anchor = None if anchor is None else anchor * std + mean
        if "personal_reward" in personal:  # differences of rewards: no shift
            personal["personal_reward"] = personal["personal_reward"] * std
    return Scores(chosen, rejected, metadata, source=str(path), anchor=anchor, personal=personal)


def _normalization(normalized, path: Path) -> tuple[float, float]:
    """(mean, std) of the metadata's `normalized`: a dict of two finite numbers, std > 0."""
    values = [normalized.get(key) for key in ("mean", "std")] if isinstance(normalized, dict) else [None]
    if not all(map(is_finite_number, values)) or values[1] <= 0:
        raise MinqrError(f"{path}: metadata normalized must be {{\"mean\": number, \"std\": number > 0}} (what score "
                         f"--normalize divided by), got {normalized!r}")
    return float(values[0]), float(values[1])


def _layout(path: Path) -> str:
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".jsonl":
        return "jsonl"
    raise MinqrError(f"scores file {path}: the name must end in .npz or .jsonl (the layout is read from it)")


def _read_npz(path: Path):
    not_ours = f"{path} is not a minqr scores file"
    arrays = read_npz(path, f"a minqr scores file; {HOW_TO_MAKE}", ("metadata", "chosen", "rejected", "anchor",
                                                                    *PERSONAL))
    names = sorted(arrays)
    if "metadata" not in names:
        with zipfile.ZipFile(path) as archive:  # what it holds instead (read_npz read only the arrays asked for)
            held = sorted(name.removesuffix(".npy") for name in archive.namelist())
        raise MinqrError(f"{not_ours}: it holds {', '.join(held) or 'no arrays'} but no 'metadata'; {HOW_TO_MAKE}")
    metadata = arrays["metadata"]
    if metadata.dtype.kind != "U" or metadata.ndim != 0:
        raise MinqrError(f"{not_ours}: its 'metadata' is not a JSON string; {HOW_TO_MAKE}")
    metadata = _parse_metadata(str(metadata), f"{path}: metadata")
    for name in ("chosen", "rejected"):
        if name not in names:
            raise MinqrError(f"{path}: scores file without a {name!r} array; {HOW_TO_MAKE}")
    personal = {name: arrays[name] for name in PERSONAL if name in names}
    return arrays["chosen"], arrays["rejected"], arrays.get("anchor"), metadata, personal


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if not lines:
        raise MinqrError(f"{path} is empty, not a minqr scores file; {HOW_TO_MAKE}")
    metadata = _parse_metadata(lines[0], f"{path}:1")
    rows, personal = {"chosen": [], "rejected": []}, {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = loads(line)
        except json.JSONDecodeError as error:
            raise MinqrError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(record, dict):
            raise MinqrError(f"{path}:{number}: a pair's line is a JSON object, "
                             '{"chosen": [...], "rejected": [...]}')
        if number == 2:  # the first pair says which optional arrays the file has; every pair has them
            rows.update({"anchor": []} if "anchor" in record else {})
            personal = {name: [] for name in PERSONAL if name in record}
        elif "anchor" in record and "anchor" not in rows:
            raise MinqrError(f"{path}:{number}: this pair has an 'anchor' but the first pair (line 2) has none; "
                             "a file's pairs all have one or none")
        unknown_personal = [name for name in PERSONAL if name in record and name not in personal]
        if unknown_personal:
            raise MinqrError(f"{path}:{number}: this pair has {unknown_personal[0]!r} but the first pair (line 2) "
                             "has none; a file's pairs all have the personal arrays or none (null in a row without)")
        for side, row in rows.items():
            values = record.get(side)
            if not isinstance(values, list) or not all(map(is_finite_number, values)):
                raise MinqrError(f"{path}:{number}: {side!r} must be a list of finite numbers, one per output")
            row.append(values)
        for name, row in personal.items():
            row.append(_personal_row(record.get(name, _ABSENT), name, len(rows["chosen"][-1]), f"{path}:{number}"))
    if not rows["chosen"]:
        raise MinqrError(f"{path}: no pairs after the metadata line; score at least one pair")
    widths = {len(values) for side in rows.values() for values in side}
    if len(widths) > 1:
        raise MinqrError(f"{path}: pairs have different numbers of outputs ({sorted(widths)}); every line needs N")
    arrays = {side: np.array(row, dtype=np.float32) for side, row in rows.items()}
    personal = {name: np.array(row, dtype=np.float32) for name, row in personal.items()}
    return arrays["chosen"], arrays["rejected"], arrays.get("anchor"), metadata, personal


_ABSENT = object()  # a line without a personal array that the first line has


def _personal_row(value, name: str, n: int, where: str):
    """One line's row of a personal array, NaN for null: a number, or a list of N (or 2) numbers."""
    width = {"N": n, None: None, 2: 2}[PERSONAL[name]]
    if value is None:
        return float("nan") if width is None else [float("nan")] * width
    ok = (is_finite_number(value) if width is None else
          isinstance(value, list) and len(value) == width and all(map(is_finite_number, value)))
    if not ok:
        shape = "a number" if width is None else f"a list of {width} numbers"
        shown = "nothing" if value is _ABSENT else repr(value)[:60]
        raise MinqrError(f"{where}: {name!r} must be {shape} or null (no known annotator), got {shown}")
    return value


def _parse_metadata(text: str, where: str) -> dict:
    try:
        metadata = loads(text)
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or not str(metadata.get("format", "")).startswith(FORMAT_FAMILY):
        raise MinqrError(f"{where}: not a minqr scores file (no 'format': {FORMAT!r} metadata); {HOW_TO_MAKE}")
    if metadata["format"] != FORMAT:
        raise MinqrError(f"{where}: written in format {metadata['format']!r}, but this minqr reads {FORMAT!r}; "
                         "use the minqr version that wrote it, or score again")
    return metadata


def _check(scores: Scores) -> None:
    """Shapes, values and metadata of `scores`: every problem a MinqrError naming the culprit."""
    where, metadata = scores.source, scores.metadata
    missing = [key for key in (*WRITER_KEYS, "format", "num_quantiles", "minqr_version") if key not in metadata]
    if missing:
        raise MinqrError(f"{where}: metadata misses {', '.join(missing)}; save_scores needs "
                         f"{', '.join(WRITER_KEYS)} (and taus for a quantile head)")
    for name in ("chosen", "rejected", "anchor"):
        array = getattr(scores, name)
        if name == "anchor" and array is None:
            continue
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
            raise MinqrError(f"{where}: {name!r} must be a numeric numpy array, not {type(array).__name__}")
        if array.ndim != 2:
            raise MinqrError(f"{where}: {name!r} has shape {array.shape}; it must be 2-D, [pairs, outputs]")
        setattr(scores, name, array.astype(np.float32, copy=False))  # the format's dtype, whatever came in
    if scores.chosen.shape != scores.rejected.shape:
        raise MinqrError(f"{where}: 'chosen' {scores.chosen.shape} and 'rejected' {scores.rejected.shape} "
                         "differ in shape; both are [pairs, outputs] for the same pairs")
    if scores.anchor is not None and scores.anchor.shape != scores.chosen.shape:
        raise MinqrError(f"{where}: 'anchor' {scores.anchor.shape} and 'chosen' {scores.chosen.shape} differ in "
                         "shape; the anchor holds the outputs for each pair's anchor reply, [pairs, outputs]")
    num_pairs, n = scores.chosen.shape
    if num_pairs == 0 or n == 0:
        raise MinqrError(f"{where}: no scores (shape {scores.chosen.shape}); score at least one pair")
    for name in ("chosen", "rejected", "anchor"):
        if getattr(scores, name) is None:
            continue
        bad = ~np.isfinite(getattr(scores, name)).all(axis=1)
        if bad.any():
            raise MinqrError(f"{where}: {name!r} holds NaN or inf in {bad.sum()} pairs (first: pair "
                             f"{int(np.argmax(bad))}); the model diverged or the scoring broke: score again")
    _check_personal(scores)
    if metadata["num_quantiles"] != n:
        raise MinqrError(f"{where}: metadata num_quantiles={metadata['num_quantiles']} but the arrays hold "
                         f"N={n} outputs per response")
    head = metadata["head"]
    if head not in HEADS:
        raise MinqrError(f"{where}: metadata head={head!r}; it must be one of {', '.join(HEADS)}")
    if head == "scalar" and n != 1:
        raise MinqrError(f"{where}: a scalar head has one output, but the arrays hold N={n}; use head='quantile'")
    taus = metadata.get("taus")
    if head == "scalar":
        if taus is not None:
            raise MinqrError(f"{where}: metadata taus={taus} for a scalar head, whose output is no quantile; use null")
    elif not (isinstance(taus, list) and len(taus) == n and all(isinstance(t, (int, float)) and 0 < t < 1 for t in taus)
              and all(a < b for a, b in zip(taus, taus[1:]))):
        raise MinqrError(f"{where}: metadata taus must list the N={n} increasing quantile levels in (0, 1) "
                         f"of the quantile head (minqr.objectives.references.quantile_levels(N)), got {taus!r}")
    if metadata.get("readout", "raw") not in READOUTS:
        raise MinqrError(f"{where}: metadata readout={metadata['readout']!r}; it must be one of {', '.join(READOUTS)}")
    for key in ("workload", "model", "data", "split"):
        if not isinstance(metadata[key], str) or not metadata[key]:
            raise MinqrError(f"{where}: metadata {key} must be a non-empty string, got {metadata[key]!r}")
    if not isinstance(metadata.get("options", {}), dict):
        raise MinqrError(f"{where}: metadata options must be a dict of the scoring options")
    for key in ("label", "truth"):
        if key in metadata and not (isinstance(metadata[key], str) and metadata[key]):
            raise MinqrError(f"{where}: metadata {key} must be a non-empty string, got {metadata[key]!r}")
    objective = metadata.get("objective")
    if objective is not None and (not isinstance(objective, str) or objective not in PAIR_MODELS):
        raise MinqrError(f"{where}: metadata objective={objective!r}; it must be one of {', '.join(PAIR_MODELS)} "
                         "(or absent)")


def _check_personal(scores: Scores) -> None:
    """The personal arrays' shapes and values: NaN rows together, posteriors that sum to 1."""
    where, (num_pairs, n) = scores.source, scores.chosen.shape
    if scores.personal and set(scores.personal) != set(PERSONAL):
        raise MinqrError(f"{where}: personal arrays {sorted(scores.personal)}: give all of {', '.join(PERSONAL)} "
                         "or none")
    for name, width in PERSONAL.items():
        if name not in scores.personal:
            continue
        array = np.asarray(scores.personal[name])
        shape = (num_pairs,) if width is None else (num_pairs, n if width == "N" else width)
        if array.shape != shape or array.dtype.kind != "f":
            raise MinqrError(f"{where}: {name!r} must be float [{', '.join(map(str, shape))}], got {array.dtype} "
                             f"{list(array.shape)}")
        scores.personal[name] = array.astype(np.float32, copy=False)
    if not scores.personal:
        return
    posterior, probability = scores.personal["personal_posterior"], scores.personal["personal_probability"]
    known = ~np.isnan(probability)
    rows = posterior[known]
    if not (np.isnan(posterior[~known]).all() and np.isnan(scores.personal["personal_reward"][~known]).all()
            and np.isfinite(rows).all() and (rows >= 0).all() and np.allclose(rows.sum(1), 1, atol=1e-4)
            and ((probability[known] >= 0) & (probability[known] <= 1)).all()
            and np.isfinite(scores.personal["personal_reward"][known]).all()):
        raise MinqrError(f"{where}: the personal arrays must hold, in the rows of a known annotator (a number in "
                         "'personal_probability', from 0 to 1), a posterior that sums to 1 and finite rewards, and "
                         "NaN in the others")
