"""Best-of-N: of K candidate replies to a prompt, pick the one a statistic of its reward
distribution ranks first, and keep every candidate's statistics.

    summary = best_of_n_to_file("runs/demo/mixture", "candidates.jsonl", "choices.jsonl",
                                statistics="mean,cvar:0.25,preference")

The input is a file of prompts, one a record (JSON lines, plain or gzipped, or Parquet/Arrow):

    {"prompt": "\\n\\nHuman: ...", "candidates": ["\\n\\nAssistant: ...", ...], "reference": "..."}

each field a string, or a list of {"role", "content"} messages; a candidate's text is the prompt
followed by the candidate, as training reads a pair (minqr.data.chat.prompt_reply_texts): a record of
message lists throughout is rendered with the tokenizer's chat template when it has one, any other
in the HH style, which the summary notes. `reference` is needed only with reference="reply".

Which reference. A statistic other than the mean means something only relative to a reference reply
to the same prompt (minqr/distribution/statistics.py): reference="group" (the default) reads each
candidate relative to the mean output of the prompt's candidates, kind by kind, and needs no extra
reply; reference="reply" reads it relative to the record's own `reference` (an SFT model's answer, a
fixed refusal). The mean picks the same candidate either way.

The output has a record per prompt, in the input's order, the same fields in JSON lines or Parquet:

    {"index": q, "origin": "FILE:LINE", "num_candidates": K,
     "chosen": {"mean": k, "cvar:0.25": k', ...}, "statistics": {"mean": [K values], ...}}

A tie goes to the earliest candidate.

Resuming. A job's progress is appended, a chunk of prompts at a time, to `.<out's name>.partial`
beside the output, under the output's lock (minqr/lock.py); its first line records what the job was
asked (model, data, statistics, reference, max_length, dtype). The same command after a crash or a
kill goes on from the last whole chunk, and the output appears at the end, written atomically, when
the partial file is removed. A different command finds the partial file and stops; with --overwrite
it starts afresh. The same command with --overwrite resumes too, so that a job replacing an output
can be interrupted and run again like any other. An existing output is never replaced without
--overwrite.
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minqr.atomic import atomic_file, check_output_file, writing
from minqr.data import tables
from minqr.data.chat import prompt_reply_texts
from minqr.data.pairs import checked_text, json_lines, json_record
from minqr.device import DTYPES, autocast_dtype, resolve_device
from minqr.distribution.statistics import parse_statistic, statistic_values
from minqr.errors import MinqrError
from minqr.lock import holds_output
from minqr.models.reward import load_reward_model
from minqr.models.tokenizer import BPE_FILE_PAIRS, CHAT_TEMPLATE_FILE
from minqr.options import check_options, option
from minqr.progress import progress_bar
from minqr.reading import loads
from minqr.study.scoring import DEFAULT_BATCH_SIZE, score_texts, text_length_limit

FIELDS = ("prompt", "candidates", "reference")
REFERENCES = ("group", "reply")
DEFAULT_STATISTICS = "mean,quantile:0.1,cvar:0.25,mean_minus_std:1.0,preference"
CHUNK_PROMPTS = 64  # prompts scored between two appends to the partial file: what a kill can cost


@dataclass(frozen=True)
class CandidateSet:
    """One prompt's candidates as the texts the model reads, and where the record came from."""

    origin: str
    texts: tuple  # [K] prompt + candidate
    reference: str | None  # prompt + reference reply, if the record has one
    hh_messages: bool = False  # messages read in the HH style (no chat template, or mixed with strings)


def read_candidate_sets(path, need_reference: bool = False, template=None) -> list[CandidateSet]:
    """Every record of a candidate file (module docstring); bad records are a MinqrError naming the
    file and line (or row)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MinqrError(f"data {path}: no such file (a JSON-lines, Parquet or Arrow file of prompts with candidates)")
    file_format = tables.columnar_format(path)
    rows = tables.file_rows(path, file_format, FIELDS) if file_format else \
        ((origin, json_record(raw, origin, "prompt and candidates")) for origin, raw in json_lines(path))
    sets = [_candidate_set(record, origin, need_reference, template) for origin, record in rows]
    if not sets:
        raise MinqrError(f"data {path} holds no prompts")
    return sets


def _candidate_set(record: dict, origin: str, need_reference: bool, template) -> CandidateSet:
    if "prompt" not in record or record["prompt"] is None:
        raise MinqrError(f"{origin}: missing field 'prompt'")
    candidates = record.get("candidates")
    if not isinstance(candidates, (list, tuple)) or not candidates:
        raise MinqrError(f"{origin}: field 'candidates' must be a non-empty list of replies, got {candidates!r:.60}")
    reference = record.get("reference")
    if need_reference and reference is None:
        raise MinqrError(f"{origin}: missing field 'reference', which reference=reply (--reference reply) reads "
                         "each candidate against; give one, or use the group of candidates (--reference group)")
    prompt = record["prompt"]
    checked_text(prompt, "prompt", origin, allow_empty=True, opens=True)
    for k, reply in enumerate(candidates):
        checked_text(reply, f"candidates[{k}]", origin)
    if need_reference:
        checked_text(reference, "reference", origin)
    replies = [*candidates, *([reference] if need_reference else [])]
    texts, hh = prompt_reply_texts(prompt, replies, template, origin)  # candidates and reference alike
    return CandidateSet(origin, tuple(texts[:len(candidates)]), texts[-1] if need_reference else None,
                        hh_messages=hh)


def parse_statistics(text: str) -> list:
    """"mean,cvar:0.25" -> their Statistics, in order, without repeats."""
    statistics = []
    for part in str(text).split(","):
        statistic = parse_statistic(part)
        if statistic not in statistics:
            statistics.append(statistic)
    return statistics


def candidate_statistics(outputs: np.ndarray, statistics, objective: str, reference: np.ndarray | None = None,
                         group: np.ndarray | None = None) -> dict:
    """Raw outputs [M, N] of the candidates of several prompts -> {str(statistic): [M] float64},
    relative to `reference` [M, N] (each candidate's reference reply) or within `group` [M] (the
    prompt of each candidate)."""
    values = torch.from_numpy(outputs.astype(np.float64))
    ref = None if reference is None else torch.from_numpy(reference.astype(np.float64))
    ids = None if group is None else torch.from_numpy(group)
    return {str(s): statistic_values(s, values, reference=ref, group=ids, objective=objective).numpy()
            for s in statistics}


def per_prompt(values: dict, group: np.ndarray) -> list:
    """{statistic: [M]} and the prompt of each candidate [M] (prompts in order, candidates adjacent)
    -> per prompt {statistic: [K] its candidates' values}."""
    bounds = np.flatnonzero(np.diff(group)) + 1
    return [dict(zip(values, parts)) for parts in zip(*(np.split(v, bounds) for v in values.values()))]


def choices(prompt_values: dict) -> dict:
    """{statistic: [K]} of one prompt -> {statistic: the index of its best candidate}, the earliest on a tie."""
    return {name: int(np.argmax(values)) for name, values in prompt_values.items()}


@dataclass
class BestOfNSummary:
    out: Path
    num_prompts: int
    resumed_from: int
    agreement: dict  # statistic but the mean -> the share of prompts where its choice is the mean's
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"chose among the candidates of {self.num_prompts:,} prompts"
                 + (f" (resumed after {self.resumed_from:,})" if self.resumed_from else "")]
        lines += [f"  {name:<22} picks the mean's choice for {share:.1%} of prompts"
                  for name, share in self.agreement.items()]
        return "\n".join(lines + self.notes + [f"wrote {self.out}"])


@dataclass
class BestOfNConfig:
    """The options of `minqr best-of-n` (best_of_n_to_file)."""

    model: str = option(help="reward model folder (train's --out), or a hub name")
    data: str = option(help="prompts with candidates: a JSON-lines (.gz), Parquet or Arrow file of records "
                       "{prompt, candidates: [...], reference}")
    out: str = option(help="choices to write: .jsonl or .parquet (a record per prompt)")
    statistics: str = option(DEFAULT_STATISTICS, "statistics to choose by, comma-separated: mean, quantile:TAU, "
                             "cvar:ALPHA, mean_minus_std:LAMBDA, preference")
    reference: str = option("group", "what each candidate's reward is read relative to: group, the mean of the "
                            "prompt's candidates kind by kind; reply, the record's own reference reply", REFERENCES)
    max_length: int | None = option(None, "tokens kept of each text, cut from the left [default: the --max-length "
                                    "the model was trained with, else its number of positions]", low=1)
    batch_size: int = option(DEFAULT_BATCH_SIZE, "texts a batch", low=1)
    device: str = option("auto", "cpu, cuda, cuda:1, ...; auto: cuda when there is a GPU")
    dtype: str = option("auto", "compute precision; auto: bfloat16 autocast on GPU, float32 on CPU", DTYPES)
    overwrite: bool = option(False, "replace --out if it exists, and drop the progress of an unfinished job with other "
                                     "options (the same job's progress is resumed)", in_file=False)

    def __post_init__(self):
        check_options(self)  # every range and choice the fields declare


def partial_path(out) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@holds_output("out")
def best_of_n_to_file(model, data, out, progress: bool = True, **options) -> BestOfNSummary:
    """Choose a candidate per prompt of `data` by each statistic, with the reward model in `model`,
    and write the choices and every candidate's statistics to `out` (module docstring). `options`
    are BestOfNConfig's other fields."""
    config = BestOfNConfig(model=model, data=data, out=out, **options)
    out = Path(out)
    check_output_file(out, overwrite=config.overwrite, what="the choices file", inputs=(("--data", data),))
    if out.suffix not in (".jsonl", ".parquet"):
        raise MinqrError(f"out {out}: the choices file's name ends in .jsonl or .parquet")
    statistics = parse_statistics(config.statistics)
    reward_model, tokenizer, folder = load_reward_model(model)
    max_length = text_length_limit(reward_model, folder, config.max_length)
    by_reply = config.reference == "reply"
    sets = read_candidate_sets(data, need_reference=by_reply, template=tokenizer.chat_template)
    data_path = Path(data).expanduser().resolve()
    device = resolve_device(config.device)
    # what decides the scores: a resumed job must match in all of it, the model's files (a model
    # retrained into the same folder), the precision actually used ("auto" differs by device) and the
    # batch size (float32 sums differ a little with the batch) included
    job = {"minqr": "best-of-n", "model": str(Path(folder).resolve()), "model_files": _model_files(folder),
           "data": str(data_path), "data_bytes": data_path.stat().st_size, "data_mtime_ns": data_path.stat().st_mtime_ns,
           "statistics": [str(s) for s in statistics], "reference": config.reference, "max_length": max_length,
           "batch_size": config.batch_size, "device_type": device.type, "dtype": str(autocast_dtype(config.dtype, device)).removeprefix("torch."),
           "texts_sha256": _texts_sha256(sets)}
    partial = partial_path(out)
    done = _resume(partial, job, sets, discard_other=config.overwrite)
    resumed = len(done)
    if not done:
        with atomic_file(partial) as tmp:  # the job line, then records are appended
            tmp.write_text(json.dumps(job) + "\n")
    objective = reward_model.head_config.objective
    truncated = 0
    # writing: a full disk is one message naming the file, and the chunks appended before stay whole
    with writing(partial), open(partial, "a") as log, progress_bar(total=len(sets), initial=len(done),
                                                                   unit="prompt", desc="best-of-n",
                                                                   disable=not progress) as bar:
        for start in range(len(done), len(sets), CHUNK_PROMPTS):
            chunk = sets[start: start + CHUNK_PROMPTS]
            records, cut = _choose(chunk, start, reward_model, tokenizer, max_length, config, device, statistics,
                                   objective)
            truncated += cut
            log.write("".join(json.dumps(r) + "\n" for r in records))
            log.flush()
            os.fsync(log.fileno())  # a chunk on disk before the next is scored: the most a kill loses
            done += records
            bar.update(len(chunk))
    _write_choices(out, done)
    partial.unlink()
    agreement = {} if "mean" not in done[0]["chosen"] else {
        name: float(np.mean([r["chosen"][name] == r["chosen"]["mean"] for r in done]))
        for name in done[0]["chosen"] if name != "mean"}
    notes = [f"note: {truncated:,} texts scored in this run were longer than {max_length} tokens and cut from the "
             "left"] if truncated else []
    lone = sum(len(candidate_set.texts) == 1 for candidate_set in sets)
    if lone and not by_reply:
        notes.append(f"note: {lone:,} prompts have one candidate: relative to its group (itself) every statistic of "
                     "it is 0 and its preference 0.5, and it is chosen as the only one")
    hh = sum(candidate_set.hh_messages for candidate_set in sets)
    if hh:
        why = "the model's tokenizer has no chat template" if tokenizer.chat_template is None else \
            "some mix strings with message lists"
        notes.append(f"note: the message lists of {hh:,} prompts were read in the HH style (\"\\n\\nHuman: ...\\n\\n"
                     f"Assistant: ...\"), as training reads them: {why}")
    return BestOfNSummary(out, len(done), resumed, agreement, notes)


def _choose(chunk, start: int, model, tokenizer, max_length: int, config, device, statistics,
            objective) -> tuple[list, int]:
    """The output records of a chunk of candidate sets, the first being prompt `start`, and how many
    of its texts were cut to max_length."""
    texts = [text for s in chunk for text in s.texts]
    group = np.repeat(np.arange(len(chunk)), [len(s.texts) for s in chunk])  # [M] the prompt of each candidate
    if config.reference == "reply":
        texts += [s.reference for s in chunk]
    encoded = tokenizer.encode_batch(texts)
    token_lists = [ids[-max_length:] for ids in encoded]
    outputs = score_texts(model, token_lists, config.batch_size, device, config.dtype)  # [M (+ Q), N]
    if config.reference == "reply":
        candidates, references = outputs[: len(group)], outputs[len(group):][group]  # [M, N] each
        values = candidate_statistics(candidates, statistics, objective, reference=references)
    else:
        values = candidate_statistics(outputs, statistics, objective, group=group)
    records = [{"index": start + q, "origin": s.origin, "num_candidates": len(s.texts), "chosen": choices(prompt),
                "statistics": {name: part.tolist() for name, part in prompt.items()}}
               for q, (s, prompt) in enumerate(zip(chunk, per_prompt(values, group)))]
    return records, sum(len(ids) > max_length for ids in encoded)


def _texts_sha256(sets: list) -> str:
    """A digest of every text the job scores, as rendered: the data and the model's files are
    recorded too, but a chat template can render the same records otherwise (one that writes
    today's date does, on another day), and a job's chunks must all come from the same texts."""
    digest = hashlib.sha256()
    for candidate_set in sets:
        digest.update(json.dumps([candidate_set.texts, candidate_set.reference]).encode() + b"\n")
    return digest.hexdigest()


def _model_files(folder) -> dict:
    """{name: [bytes, mtime_ns]} of the files of a model folder that decide its scores: its config,
    weights, and every file the tokenizer and its chat template are read from."""
    folder = Path(folder)
    tokenizer_files = (CHAT_TEMPLATE_FILE, *(name for pair in BPE_FILE_PAIRS for name in pair))
    names = sorted({p.name for pattern in ("config.json", "*.safetensors", "*.bin", "tokenizer*.json", *tokenizer_files)
                    for p in folder.glob(pattern) if p.is_file()})
    return {name: [(folder / name).stat().st_size, (folder / name).stat().st_mtime_ns] for name in names}


def _resume(partial: Path, job: dict, sets: list, discard_other: bool) -> list:
    """The records an unfinished job with the same `job` line left in `partial` for the candidate
    `sets` ([] if none), whole chunks only: a kill mid-append leaves a torn chunk, which is scored
    again as a whole, so that every chunk is batched as in a run without the kill. What is not a
    record of this job (a torn or foreign line) ends them. Another job's partial file is removed
    with `discard_other` (--overwrite), else a MinqrError."""
    if not partial.exists() and not partial.is_symlink():
        return []
    if partial.is_symlink() or not partial.is_file():  # a link would have the job append to another file
        raise MinqrError(f"{partial} is not a file: best-of-n keeps an unfinished job's progress there; move it away")
    text = partial.read_bytes().decode("utf-8", errors="replace")  # a damaged byte ends the records, below
    lines = text.split("\n")
    try:
        found = loads(lines[0])
    except json.JSONDecodeError:
        found = None
    if found != job and discard_other:
        partial.unlink()
        return []
    if found != job:
        raise MinqrError(f"{partial} holds the progress of an unfinished best-of-n job {_job_difference(found, job)}: "
                         "run that job's command again to finish it, or pass --overwrite to start this one afresh")
    records = []
    for q, line in enumerate(lines[1: len(sets) + 1]):
        try:
            record = loads(line)
        except json.JSONDecodeError:
            break  # the torn end of an append cut short (or the empty string after the last newline)
        if not _is_record(record, q, sets[q], job["statistics"]):
            break
        record["origin"] = sets[q].origin  # the data's path as this command spells it (the job line's is resolved)
        records.append(record)
    if len(records) < len(sets):
        records = records[: len(records) // CHUNK_PROMPTS * CHUNK_PROMPTS]
    kept = "".join(json.dumps(r) + "\n" for r in [job, *records])
    if text != kept:  # keep only the whole chunks, before more are appended
        with atomic_file(partial) as tmp:
            tmp.write_text(kept)
    return records


def _is_record(record, q: int, candidate_set: CandidateSet, statistics: list) -> bool:
    """Whether `record` is what _choose writes for prompt q, `candidate_set`, by `statistics`. Its
    origin's line (or row) must be the set's; the path before it may be spelled otherwise."""
    k = len(candidate_set.texts)
    origin = record.get("origin") if isinstance(record, dict) else None
    return (isinstance(origin, str) and origin.rpartition(":")[2] == candidate_set.origin.rpartition(":")[2]
            and record.get("index") == q
            and record.get("num_candidates") == k
            and isinstance(record.get("chosen"), dict) and list(record["chosen"]) == statistics
            and all(isinstance(c, int) and 0 <= c < k for c in record["chosen"].values())
            and isinstance(record.get("statistics"), dict) and list(record["statistics"]) == statistics
            and all(isinstance(v, list) and len(v) == k for v in record["statistics"].values()))


def _job_difference(found, job: dict) -> str:
    """What differs between a partial file's job line and this job, in words."""
    if not isinstance(found, dict) or found.get("minqr") != "best-of-n":
        return "of another kind (its first line is not a best-of-n job)"
    if set(found) != set(job):
        return "of another minqr (its job line records other things)"
    differing = [key for key in job if found[key] != job[key]]
    shown = []
    for key in differing:
        if key == "model_files":
            shown.append("the model's files have changed since")
        elif key in ("data_bytes", "data_mtime_ns"):
            if "data" not in differing:
                shown.append("the data has changed since")
        elif key == "texts_sha256":
            if not {"data", "data_bytes", "data_mtime_ns", "model_files"} & set(differing):
                shown.append("the candidates render to other texts (a chat template that writes today's date "
                             "renders them otherwise on another day)")
        else:
            shown.append(f"{key} {found[key]!r} (this one: {job[key]!r})")
    return "with other settings: " + "; ".join(dict.fromkeys(shown))


def _write_choices(out: Path, records: list) -> None:
    with atomic_file(out) as tmp:
        if out.suffix == ".jsonl":
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            return
        pa = tables.require("pyarrow", f"writing {out} (Parquet)")
        parquet = tables.require("pyarrow.parquet", f"writing {out} (Parquet)")
        parquet.write_table(pa.Table.from_pylist(records), tmp)
