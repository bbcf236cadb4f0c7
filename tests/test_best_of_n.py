"""minqr best-of-n: the choices against statistic_values on each text scored alone, the two file
formats, resuming after a crash, and bad input named by file and line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_scoring import alone, random_reward_model

from minqr import MinqrError, load_tokenizer
from minqr.adapters import best_of_n
from minqr.adapters.best_of_n import best_of_n_to_file, partial_path
from minqr.distribution.statistics import statistic_values
from minqr_cli.commands import main as cli
from factories import tiny_config, write_tiny_tokenizer

STATISTICS = "mean,quantile:0.2,cvar:0.3,mean_minus_std:0.5,preference"
MAX_LENGTH = 60


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), layout="tokenizer.json"))


@pytest.fixture(scope="module", params=[("quantile", 6), ("scalar", 1)])
def model(request, tmp_path_factory, tokenizer):
    kind, n = request.param
    folder = tmp_path_factory.mktemp(kind)
    network = random_reward_model(kind, n, seed=3)
    network.save_pretrained(folder, tokenizer=tokenizer, training_args={"max_length": MAX_LENGTH})
    return folder, network


def candidate_records(seed=0, prompts=7):
    """Prompts of 1 to 5 candidates, strings and message lists, each with a reference reply."""
    rng = np.random.default_rng(seed)
    words = ["fix", "the", "bike", "garden", "joke", "clear", "polite", "rude", "now", "please"]
    records = []
    for q in range(prompts):
        def reply():
            return " ".join(rng.choice(words, size=rng.integers(1, 6)))
        candidates = [f"\n\nAssistant: {reply()}" for _ in range(rng.integers(1, 6))]
        record = {"prompt": f"\n\nHuman: how do I {reply()}?", "candidates": candidates,
                  "reference": "\n\nAssistant: ok"}
        if q % 3 == 2:  # the same as messages
            record = {"prompt": [{"role": "user", "content": f"how do I {reply()}?"}],
                      "candidates": [[{"role": "assistant", "content": reply()}] for _ in candidates],
                      "reference": [{"role": "assistant", "content": "ok"}]}
        records.append(record)
    return records


def render(value):
    if isinstance(value, str):
        return value
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in value)


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("reference", ["group", "reply"])
def test_choices_are_the_argmax_of_statistic_values_on_texts_scored_alone(tmp_path, tokenizer, model, reference):
    folder, network = model
    records = candidate_records()
    records.insert(3, {"prompt": "\n\nHuman: " + "please fix the bike now " * 20, "reference": "\n\nAssistant: ok",
                       "candidates": ["\n\nAssistant: no", "\n\nAssistant: the garden"]})  # cut from the left
    data = write(tmp_path / "c.jsonl", records)
    out = tmp_path / "choices.jsonl"
    summary = best_of_n_to_file(folder, data, out, statistics=STATISTICS, reference=reference, progress=False)
    assert summary.num_prompts == len(records)
    written = read(out)
    for name, share in summary.agreement.items():
        assert share == np.mean([r["chosen"][name] == r["chosen"]["mean"] for r in written])
    assert set(summary.agreement) == {str(best_of_n.parse_statistic(s)) for s in STATISTICS.split(",")} - {"mean"}
    texts = [render(r["prompt"]) + render(c) for r in records for c in r["candidates"]]
    texts += [render(r["prompt"]) + render(r["reference"]) for r in records] if reference == "reply" else []
    long = sum(len(tokenizer.encode(t)) > MAX_LENGTH for t in texts)
    messages = sum(isinstance(r["prompt"], list) for r in records)  # the tokenizer has no chat template
    lone = sum(len(r["candidates"]) == 1 for r in records)
    lone_note = [f"note: {lone:,} prompts have one candidate: relative to its group (itself) every statistic of it "
                 "is 0 and its preference 0.5, and it is chosen as the only one"] if reference == "group" else []
    assert long >= 2 and messages >= 2 and lone >= 1 and summary.notes == [
        f"note: {long:,} texts scored in this run were longer than {MAX_LENGTH} tokens and cut from the left",
        *lone_note,
        f"note: the message lists of {messages:,} prompts were read in the HH style (\"\\n\\nHuman: ...\\n\\n"
        "Assistant: ...\"), as training reads them: the model's tokenizer has no chat template"]
    objective = network.head_config.objective
    for q, (record, result) in enumerate(zip(records, written)):
        texts = [render(record["prompt"]) + render(c) for c in record["candidates"]]
        outputs = torch.tensor(np.array([alone(network, tokenizer, t, MAX_LENGTH) for t in texts]), dtype=torch.float64)
        K = len(texts)
        if reference == "group":
            given = {"group": torch.zeros(K, dtype=torch.long)}
        else:
            ref = alone(network, tokenizer, render(record["prompt"]) + render(record["reference"]), MAX_LENGTH)
            given = {"reference": torch.tensor(ref, dtype=torch.float64).expand(K, -1)}
        assert result["index"] == q and result["origin"] == f"{data}:{q + 1}" and result["num_candidates"] == K
        for statistic in STATISTICS.split(","):
            expected = statistic_values(statistic, outputs, objective=objective, **given).numpy()
            name = str(best_of_n.parse_statistic(statistic))
            np.testing.assert_allclose(result["statistics"][name], expected, atol=2e-5)
            # the pick is the best candidate (within float32 scoring's noise of it) and the earliest of ties
            values = np.array(result["statistics"][name])
            assert result["chosen"][name] == int(np.argmax(values))
            assert expected[result["chosen"][name]] >= expected.max() - 4e-5


def test_identical_candidates_tie_and_the_earliest_is_chosen(tmp_path, model):
    """Copies of one candidate (common among N samples) get the same statistics to the bit, so the
    documented tie rule holds: the earliest copy is chosen (packing once moved the last bits, and a
    later copy won about half the time)."""
    folder, _ = model
    records = [{"prompt": f"\n\nHuman: how do I fix the {thing}?",
                "candidates": [f"\n\nAssistant: {a}", f"\n\nAssistant: {b}", f"\n\nAssistant: {b}",
                               f"\n\nAssistant: {b}", f"\n\nAssistant: {a}"]}
               for thing in ("bike", "garden", "joke", "now") for a, b in (("no", "please fix it"), ("ok", "the bike"))]
    out = tmp_path / "choices.jsonl"
    best_of_n_to_file(folder, write(tmp_path / "dups.jsonl", records), out, statistics=STATISTICS, progress=False)
    for record, result in zip(records, read(out)):
        for name, values in result["statistics"].items():
            assert values[1] == values[2] == values[3] and values[0] == values[4], name
            chosen = result["chosen"][name]
            assert chosen == record["candidates"].index(record["candidates"][chosen]), (name, values)


def test_parquet_in_and_out_give_the_json_lines_records(tmp_path, model):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder, _ = model
    records = [r for r in candidate_records(seed=1) if isinstance(r["prompt"], str)]  # one column type each
    data = write(tmp_path / "c.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    best_of_n_to_file(folder, data, tmp_path / "a.jsonl", statistics=STATISTICS, progress=False)
    best_of_n_to_file(folder, tmp_path / "c.parquet", tmp_path / "b.parquet", statistics=STATISTICS, progress=False)
    from_json, from_parquet = read(tmp_path / "a.jsonl"), pq.read_table(tmp_path / "b.parquet").to_pylist()
    for a, b in zip(from_json, from_parquet, strict=True):
        assert a["chosen"] == b["chosen"] and a["index"] == b["index"]
        for name in a["statistics"]:
            np.testing.assert_allclose(a["statistics"][name], b["statistics"][name], atol=1e-6)


def chunked_job(tmp_path, model, monkeypatch, seed: int, prompts: int):
    """(model folder, data, a clean run's output, the output to write) of a job in chunks of 3
    prompts. Chunks batch the texts, and float32 sums depend a little on the batch: an interrupted
    job must resume on the same chunks to write the clean run's bytes."""
    folder, _ = model
    data = write(tmp_path / "c.jsonl", candidate_records(seed=seed, prompts=prompts))
    monkeypatch.setattr(best_of_n, "CHUNK_PROMPTS", 3)
    clean = tmp_path / "clean.jsonl"
    best_of_n_to_file(folder, data, clean, statistics=STATISTICS, progress=False)
    return folder, data, clean, tmp_path / "out.jsonl"


def crash_at_chunk(monkeypatch, chunk: int) -> tuple[list, object]:
    """best_of_n._choose made to record each chunk's first prompt and to raise KeyboardInterrupt (a
    kill) at the `chunk`-th call; returns (the calls, the real _choose)."""
    real_choose, calls = best_of_n._choose, []

    def crashing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == chunk:
            raise KeyboardInterrupt
        return real_choose(*args, **kwargs)

    monkeypatch.setattr(best_of_n, "_choose", crashing)
    return calls, real_choose


def test_a_crashed_job_resumes_to_the_same_file(tmp_path, model, monkeypatch):
    folder, data, clean, out = chunked_job(tmp_path, model, monkeypatch, seed=2, prompts=11)
    calls, real_choose = crash_at_chunk(monkeypatch, 3)  # killed while scoring the third chunk
    with pytest.raises(KeyboardInterrupt):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    assert not out.exists() and len(read(partial_path(out))) == 1 + 6  # the job line and two chunks
    with open(partial_path(out), "a") as f:
        f.write('{"index": 6, "origin": "torn')  # and a kill half-way through an append
    monkeypatch.setattr(best_of_n, "_choose", real_choose)
    # another job's options do not pick up this progress, and the message says what differs
    with pytest.raises(MinqrError) as refused:
        best_of_n_to_file(folder, data, out, statistics="mean", progress=False)
    assert str(refused.value) == (
        f"{partial_path(out)} holds the progress of an unfinished best-of-n job with other settings: statistics "
        f"{STATISTICS.split(',')!r} (this one: ['mean']): run that job's command again to finish it, or pass "
        "--overwrite to start this one afresh")
    # nor does a model retrained into the same folder (its weights file changed)
    weights = next(Path(folder).glob("*.safetensors"))
    before = weights.stat()
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    with pytest.raises(MinqrError, match="unfinished best-of-n job with other settings: the model's files have changed since:"):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    # nor a chat template added beside the tokenizer (message lists would be rendered otherwise)
    (Path(folder) / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(MinqrError, match="unfinished best-of-n job with other settings: the model's files have changed since:"):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    (Path(folder) / "chat_template.jinja").unlink()
    # a job line that records other things (another minqr's): said so
    saved = partial_path(out).read_text()
    job, rest = saved.split("\n", 1)
    partial_path(out).write_text(json.dumps({k: v for k, v in json.loads(job).items() if k != "model_files"}) + "\n"
                                 + rest)
    with pytest.raises(MinqrError, match="unfinished best-of-n job of another minqr"):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    partial_path(out).write_text(saved)
    calls.clear()
    monkeypatch.setattr(best_of_n, "_choose", lambda *a, **k: calls.append(a[1]) or real_choose(*a, **k))
    # the same data by another spelling of its path (the job line holds it resolved): the same job
    respelled = Path(os.path.relpath(data))
    assert str(respelled) != str(data)
    summary = best_of_n_to_file(folder, respelled, out, statistics=STATISTICS, progress=False)
    assert calls == [6, 9] and summary.resumed_from == 6  # only what was not on disk was scored again
    assert out.read_text() == clean.read_text().replace(str(data), str(respelled))
    assert not partial_path(out).exists()
    with pytest.raises(MinqrError, match="exists: pass --overwrite"):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    best_of_n_to_file(folder, data, out, statistics="mean", overwrite=True, progress=False)
    assert list(read(out)[0]["chosen"]) == ["mean"]
    held = data.read_bytes()  # the prompts themselves as --out, with --overwrite: refused, kept as they were
    with pytest.raises(MinqrError, match=f"^out {data} is also --data, which this job reads: writing there would "
                                         "replace it; choose another path$"):
        best_of_n_to_file(folder, data, data, statistics="mean", overwrite=True, progress=False)
    assert data.read_bytes() == held


def test_a_job_resumes_only_on_the_texts_it_began_with(tmp_path, model, monkeypatch):
    """A chat template that writes today's date renders the same records otherwise on another day:
    a job begun on one day is not finished with the other day's texts."""
    import shutil
    from datetime import datetime

    from minqr.models import chat_template

    folder = tmp_path / "model"
    shutil.copytree(model[0], folder)
    (folder / "chat_template.jinja").write_text(
        "{{ strftime_now('%d %b %Y') }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    data = write(tmp_path / "c.jsonl", candidate_records(seed=6, prompts=6))  # prompts 2 and 5 are messages
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(best_of_n, "CHUNK_PROMPTS", 3)
    calls, real_choose = crash_at_chunk(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        best_of_n_to_file(folder, data, out, statistics="mean", progress=False)
    monkeypatch.setattr(best_of_n, "_choose", lambda *a, **k: calls.append(a[1]) or real_choose(*a, **k))

    class AnotherDay(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2030, 1, 2)

    monkeypatch.setattr(chat_template, "datetime", AnotherDay)
    with pytest.raises(MinqrError) as refused:
        best_of_n_to_file(folder, data, out, statistics="mean", progress=False)
    assert str(refused.value) == (
        f"{partial_path(out)} holds the progress of an unfinished best-of-n job with other settings: the candidates "
        "render to other texts (a chat template that writes today's date renders them otherwise on another day): "
        "run that job's command again to finish it, or pass --overwrite to start this one afresh")
    monkeypatch.setattr(chat_template, "datetime", datetime)  # the day it began: it finishes
    calls.clear()
    assert best_of_n_to_file(folder, data, out, statistics="mean", progress=False).resumed_from == 3
    assert calls == [3]


def test_overwrite_resumes_its_own_job_and_drops_another(tmp_path, model, monkeypatch):
    """A job replacing an output with --overwrite resumes after a crash when run again as it was, a
    kill between writing the output and removing the progress file leaves nothing once run again,
    and another job's progress is dropped by --overwrite."""
    folder, data, clean, out = chunked_job(tmp_path, model, monkeypatch, seed=4, prompts=8)
    out.write_text("the user's earlier choices\n")
    calls, real_choose = crash_at_chunk(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, overwrite=True, progress=False)
    assert out.read_text() == "the user's earlier choices\n"  # replaced only when the job is done
    calls.clear()
    monkeypatch.setattr(best_of_n, "_choose", lambda *a, **k: calls.append(a[1]) or real_choose(*a, **k))
    assert best_of_n_to_file(folder, data, out, statistics=STATISTICS, overwrite=True,
                             progress=False).resumed_from == 3
    assert calls == [3, 6] and out.read_text() == clean.read_text()

    # killed after the output was written, before its progress file was removed
    assert not partial_path(out).exists()
    monkeypatch.setattr(best_of_n, "_choose", real_choose)
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: None if self == partial_path(out) else
                        real_unlink(self, *a, **k))
    best_of_n_to_file(folder, data, out, statistics=STATISTICS, overwrite=True, progress=False)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert partial_path(out).exists()
    with pytest.raises(MinqrError, match="exists: pass --overwrite"):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    calls.clear()
    monkeypatch.setattr(best_of_n, "_choose", lambda *a, **k: calls.append(a[1]) or real_choose(*a, **k))
    best_of_n_to_file(folder, data, out, statistics=STATISTICS, overwrite=True, progress=False)
    assert calls == [] and not partial_path(out).exists() and out.read_text() == clean.read_text()

    # another job's progress: refused without --overwrite, dropped with it
    monkeypatch.setattr(best_of_n, "_choose", real_choose)
    crash_at_chunk(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        best_of_n_to_file(folder, data, out, statistics="mean", overwrite=True, progress=False)
    assert partial_path(out).exists()
    monkeypatch.setattr(best_of_n, "_choose", real_choose)
    with pytest.raises(MinqrError, match="exists: pass --overwrite"):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    best_of_n_to_file(folder, data, out, statistics=STATISTICS, overwrite=True, progress=False)
    assert out.read_text() == clean.read_text() and not partial_path(out).exists()


@pytest.mark.parametrize("damage", ["a record of another prompt", "an empty record", "a damaged byte",
                                    "a torn chunk"])
def test_what_is_not_a_whole_chunk_of_this_job_is_scored_again(tmp_path, model, monkeypatch, damage):
    """The progress file's records end at the first line that is not this job's record for its
    prompt, and are cut back to whole chunks: the job then writes what a run without the damage
    writes, byte for byte (the same chunks, so the same batches)."""
    folder, data, clean, out = chunked_job(tmp_path, model, monkeypatch, seed=5, prompts=10)
    real_choose = best_of_n._choose
    monkeypatch.setattr(best_of_n, "_choose", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if a[1] == 6 else real_choose(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    lines = partial_path(out).read_bytes().split(b"\n")[:-1]  # the job line and prompts 0 to 5
    assert len(lines) == 7
    if damage == "a record of another prompt":
        lines[5] = lines[2]  # prompt 4's line holds prompt 1's record
    elif damage == "an empty record":
        lines[5] = b"{}"
    elif damage == "a damaged byte":
        lines[5] = lines[5][:20] + b"\xff" + lines[5][21:]
    else:
        lines = lines[:6]  # prompt 5's line was never appended: the second chunk is torn
    partial_path(out).write_bytes(b"\n".join(lines) + b"\n")
    calls = []
    monkeypatch.setattr(best_of_n, "_choose", lambda *a, **k: calls.append(a[1]) or real_choose(*a, **k))
    summary = best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    assert summary.resumed_from == 3 and calls == [3, 6, 9]
    assert out.read_bytes() == clean.read_bytes()


def test_a_folder_or_a_link_in_place_of_the_progress_file_is_named(tmp_path, model):
    folder, _ = model
    data = write(tmp_path / "c.jsonl", candidate_records(seed=5, prompts=2))
    out = tmp_path / "out.jsonl"
    partial_path(out).mkdir()
    with pytest.raises(MinqrError) as refused:
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    assert str(refused.value) == (f"{partial_path(out)} is not a file: best-of-n keeps an unfinished job's progress "
                                  "there; move it away")
    # nor a link, which would have the job append to the file it points to (another job's, say)
    partial_path(out).rmdir()
    other = tmp_path / "other.partial"
    other.write_text("another job's\n")
    partial_path(out).symlink_to(other)
    with pytest.raises(MinqrError, match="is not a file: best-of-n keeps"):
        best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    assert other.read_text() == "another job's\n"


def test_a_full_disk_while_appending_is_one_message_and_the_job_resumes(tmp_path, model, monkeypatch):
    """The progress file's appends find the disk full (they go to /dev/full): one message naming the
    file, what it held stays whole, and the job run again finishes to the same file."""
    folder, data, clean, out = chunked_job(tmp_path, model, monkeypatch, seed=2, prompts=11)

    def appends_to_a_full_disk(path, mode="r", *args, **kwargs):
        return open("/dev/full" if mode == "a" else path, mode, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(best_of_n, "open", appends_to_a_full_disk, raising=False)
        with pytest.raises(MinqrError) as caught:
            best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    assert str(caught.value) == (f"cannot write {partial_path(out)}: no space left on device; free some space or "
                                 "write elsewhere")
    assert len(read(partial_path(out))) == 1  # the job line, whole
    summary = best_of_n_to_file(folder, data, out, statistics=STATISTICS, progress=False)
    assert summary.resumed_from == 0 and out.read_text() == clean.read_text()


KILLED_JOB = """
import sys, time
from minqr.adapters import best_of_n
best_of_n.CHUNK_PROMPTS = 2
real = best_of_n._choose
best_of_n._choose = lambda *a, **k: time.sleep(0.3) or real(*a, **k)  # slow enough to be killed mid-way
best_of_n.best_of_n_to_file(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
"""


@pytest.mark.slow  # a Python started and killed: a minute on a busy 2-core CPU; the crash test above is fast
def test_a_killed_job_resumes_to_the_same_file(tmp_path, model, monkeypatch):
    """SIGKILL, no clean-up at all: the lock and the partial file are left as they were."""
    folder, _ = model
    data = write(tmp_path / "c.jsonl", candidate_records(seed=4, prompts=30))
    monkeypatch.setattr(best_of_n, "CHUNK_PROMPTS", 2)
    clean = tmp_path / "clean.jsonl"
    best_of_n_to_file(folder, data, clean, progress=False)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    job = subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(folder), str(data), str(out)], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            if partial_path(out).exists() and len(partial_path(out).read_text().splitlines()) >= 1 + 4:
                break
            time.sleep(0.05)
        assert job.poll() is None, "the job ended before it could be killed"
        job.send_signal(signal.SIGKILL)
        job.wait()
    finally:
        if job.poll() is None:
            job.kill()
    assert not out.exists()
    summary = best_of_n_to_file(folder, data, out, progress=False)
    assert 4 <= summary.resumed_from < 30
    assert out.read_text() == clean.read_text()


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "candidates": ["b"], "reference": "c"', "malformed JSON (Expecting ',' delimiter at column 54)"),
    ('["a"]', "expected a JSON object with prompt and candidates"),
    ('{"candidates": ["b"], "reference": "c"}', "missing field 'prompt'"),
    ('{"prompt": "a", "candidates": [], "reference": "c"}', "'candidates' must be a non-empty list"),
    ('{"prompt": "a", "candidates": "b", "reference": "c"}', "'candidates' must be a non-empty list"),
    ('{"prompt": "a", "candidates": ["b", 3], "reference": "c"}', "field 'candidates[1]' must be a string"),
    ('{"prompt": "a", "candidates": ["b", " "], "reference": "c"}', "field 'candidates[1]' is empty"),
    ('{"prompt": "a", "candidates": ["b"]}', "missing field 'reference'"),
])
def test_bad_input_is_named_by_file_and_line(tmp_path, model, line, message):
    folder, _ = model
    good = json.dumps({"prompt": "a", "candidates": ["b"], "reference": "c"})
    data = tmp_path / "c.jsonl"
    data.write_text(f"{good}\n\n{good}\n{line}\n")
    result = CliRunner().invoke(cli, ["best-of-n", "--model", str(folder), "--data", str(data), "--out",
                                      str(tmp_path / "o.jsonl"), "--reference", "reply"])
    assert result.exit_code == 1
    assert f"{data}:4: " in result.output and message in result.output, result.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("options,message", [
    (["--statistics", "mean,cvar:2"], "the level must be alpha in (0, 1]"),
    (["--statistics", "median"], "unknown statistic 'median'"),
    (["--out", "x.csv"], "ends in .jsonl or .parquet"),
    (["--out", "a-folder.jsonl"], "a-folder.jsonl is a folder: minqr writes the choices file there"),
    (["--data", "missing.jsonl"], "no such file"),
])
def test_bad_options_are_named(tmp_path, model, options, message):
    folder, _ = model
    data = write(tmp_path / "c.jsonl", candidate_records(prompts=2))
    args = {"--model": str(folder), "--data": str(data), "--out": str(tmp_path / "o.jsonl")}
    (tmp_path / "a-folder.jsonl").mkdir()
    for flag, value in zip(options[::2], options[1::2]):
        args[flag] = value if flag == "--statistics" else str(tmp_path / value)
    result = CliRunner().invoke(cli, ["best-of-n", *[x for pair in args.items() for x in pair]])
    assert result.exit_code == 1 and message in result.output, result.output


def test_message_lists_are_rendered_by_the_chat_template(tmp_path):
    """With a tokenizer that has a chat template, a candidate reads as transformers renders the
    conversation (the real client as the reference)."""
    transformers = pytest.importorskip("transformers")
    from test_chat import write_chat_tokenizer
    tokenizer_folder = write_chat_tokenizer(tmp_path / "tok", "chatml")
    tokenizer = load_tokenizer(tokenizer_folder)
    network = random_reward_model("quantile", 4, seed=5, config=tiny_config(vocab_size=tokenizer.vocab_size,
                                                                             n_positions=MAX_LENGTH))
    folder = tmp_path / "model"
    network.save_pretrained(folder, tokenizer=tokenizer, training_args={"max_length": MAX_LENGTH})
    records = [r for r in candidate_records(seed=5, prompts=9) if isinstance(r["prompt"], list)]
    # messages mixed with strings read as training reads such a pair: the HH text, and the summary says so
    records.append({**records[0], "candidates": ["\n\nAssistant: fix it", "\n\nAssistant: no"]})
    data = write(tmp_path / "c.jsonl", records)
    summary = best_of_n_to_file(folder, data, tmp_path / "o.jsonl", reference="reply", statistics="cvar:0.5",
                                progress=False)
    assert summary.notes == ['note: the message lists of 1 prompts were read in the HH style ("\\n\\nHuman: ...'
                             '\\n\\nAssistant: ..."), as training reads them: some mix strings with message lists']
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    for record, result in zip(records, read(tmp_path / "o.jsonl"), strict=True):
        def scored(reply):
            mixed = isinstance(record["candidates"][0], str)  # the whole record, as training reads a pair
            text = render(record["prompt"]) + render(reply) if mixed else \
                hf.apply_chat_template(record["prompt"] + reply, tokenize=False)
            return torch.tensor(alone(network, tokenizer, text, MAX_LENGTH), dtype=torch.float64)
        outputs = torch.stack([scored(c) for c in record["candidates"]])
        reference = scored(record["reference"]).expand(len(outputs), -1)
        expected = statistic_values("cvar:0.5", outputs, reference=reference, objective="mixture").numpy()
        np.testing.assert_allclose(result["statistics"]["cvar:0.5"], expected, atol=2e-5)
