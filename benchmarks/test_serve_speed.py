"""`minqr serve` under load: 8 concurrent clients against `minqr score`'s pairs/s on the same texts.

Two models, both mixture heads of N = 10 with random weights (speed does not depend on training):
the demo's tiny GPT-2 and one of GPT-2 small's shape (MODELS below), on the synthetic task's test
pairs. `minqr score` scores them in-process; then `minqr serve --statistic mean` runs as a real
process, and 8 client threads, each on its own keep-alive connection, send every pair's two texts
as OpenRLHF would, a prompt's two samples one after the other: one query a request (what OpenRLHF
sends since its rollouts became per sample), and again in micro-batches of 16 queries (what its
older versions sent); then 64 clients at one query a request, closer to OpenRLHF's real load (a
rollout's samples at once), to show the batches filling. A tenth of the
requests are malformed (bad JSON, wrong types, missing keys, an empty query, a body over the size
limit): each must get its 4xx JSON answer. Every good answer is checked against the scores (the
mean of the query's outputs; float32, batched differently, so to 1e-4), the server must still be
healthy at the end, and SIGTERM must stop it with exit status 0.

Printed: pairs/s of score and of the server (good queries / 2 over the wall time of the load),
their ratio (target: at least 0.8 with 8 clients), the latency of good requests, p50 and p99, and
the texts a forward pass held on average.
"""
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minqr import load_tokenizer
from minqr.synthetic.folder import make_synthetic_task
from minqr.models.gpt2 import GPT2Config
from minqr.models.reward import RewardModel
from minqr.study.scoring import score_to_file
from minqr.study.scores_file import load_scores

NUM_PAIRS = 1000
CLIENTS = 8  # the target's load; 64 as well, to show that more concurrent requests fill the batches
MALFORMED_EVERY = 10  # one request in ten is malformed
MAX_REQUEST_BYTES = 4096  # small, so that one malformed request can be too long
TARGET = 0.8
START_TIMEOUT_S = 120.0
LOAD_TIMEOUT_S = 300.0

MALFORMED = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (json.dumps({"prompts": ["a"]}).encode(), 400),
    (json.dumps({"query": "one text, not a list"}).encode(), 400),
    (json.dumps({"query": [1, 2]}).encode(), 400),
    (json.dumps({"query": []}).encode(), 400),
    (json.dumps({"query": [""]}).encode(), 400),
    (json.dumps({"query": ["x" * MAX_REQUEST_BYTES]}).encode(), 413),
]


# the two models served: the demo's (2 blocks of width 64: a forward of 32 texts costs about as
# much as the HTTP work of two requests) and one of GPT-2 small's shape (12 blocks of width 768, the
# smallest reward model in real use), both random (speed does not depend on training), and the
# pairs each is timed on (fewer for the larger one, whose forward is about 200 times dearer), and
# the rounds of score-then-load, the best of each reported (a round of the demo's takes a second or
# less, and this 2-core machine's rate varies by a fifth from one to the next)
MODELS = {"demo": (None, NUM_PAIRS, 3),
          "gpt2-small": (dict(n_positions=128, n_embd=768, n_layer=12, n_head=12), 200, 1)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(root folder: the task and the models, the test pairs' texts: pair p's chosen at 2p, its
    rejected at 2p + 1, as an RL trainer sends a prompt's samples together)."""
    root = tmp_path_factory.mktemp("serve")
    task = make_synthetic_task(root / "task", num_train=2000, num_test=NUM_PAIRS, num_samples=8)
    tokenizer = load_tokenizer(task / "model")
    lines = (task / "test.jsonl").read_text().splitlines()
    for name, (shape, num_pairs, _) in MODELS.items():
        torch.manual_seed(0)
        if shape is None:
            model = RewardModel.from_backbone(task / "model", num_quantiles=10, objective="mixture")
        else:
            config = GPT2Config(vocab_size=tokenizer.vocab_size, **shape)
            model = RewardModel.from_config(config, num_quantiles=10, objective="mixture")
        model.save_pretrained(root / name, tokenizer=tokenizer)
        (root / f"{name}.jsonl").write_text("\n".join(lines[:num_pairs]) + "\n")
    lines = [json.loads(line) for line in lines]
    return root, [text for line in lines for text in (line["chosen"], line["rejected"])]


def score_rate(root: Path, model: str, name: str) -> tuple:
    """`minqr score` of `model` on its test pairs: (outputs [2P, N], pair p's chosen at row 2p, its
    rejected at 2p + 1; pairs/s). Measured right before each load, so that both see the same machine."""
    num_pairs = MODELS[model][1]
    summary = score_to_file(root / model, root / f"{model}.jsonl", root / f"{name}.npz", progress=False)
    scores = load_scores(root / f"{name}.npz")
    outputs = np.stack([scores.chosen, scores.rejected], axis=1)  # [P, 2, N]
    return outputs.reshape(2 * num_pairs, -1), num_pairs / summary.seconds  # [2P, N]


def start_server(model: Path):
    """A `minqr serve` process on a free port: (process, (host, port))."""
    command = [sys.executable, "-c", "from minqr_cli.commands import main; main()", "serve", "--model", str(model),
               "--statistic", "mean", "--port", "0", "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            assert process.poll() is None, "minqr serve exited before it listened"
            continue
        found = re.search(r"http://([\d.]+):(\d+)/", line)
        if found:
            return process, (found[1], int(found[2]))
    process.kill()
    raise AssertionError("minqr serve did not listen within the timeout")


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple:
    """(status, parsed JSON answer) of one POST /get_reward."""
    connection.request("POST", "/get_reward", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def run_load(address, texts, per_request: int, clients: int = CLIENTS) -> dict:
    """`clients` threads send `texts` in requests of `per_request` queries, malformed ones mixed in.
    Returns {index of the first text of a request: its rewards}, latencies, wall time and failures."""
    work = queue.Queue()
    for number, start in enumerate(range(0, len(texts), per_request)):
        if number % MALFORMED_EVERY == MALFORMED_EVERY - 1:
            work.put(("bad", MALFORMED[(number // MALFORMED_EVERY) % len(MALFORMED)]))
        work.put(("good", start))
    answers, latencies, failures = {}, [], []
    deadline = time.monotonic() + LOAD_TIMEOUT_S

    def client():
        connection = http.client.HTTPConnection(*address, timeout=60)
        while time.monotonic() < deadline:
            try:
                kind, item = work.get_nowait()
            except queue.Empty:
                break
            if kind == "bad":
                body, expected = item
                status, answer = post(connection, body)
                if status != expected or "error" not in answer:
                    failures.append(f"malformed {body[:40]!r}: {status} {answer}")
                connection.close()  # the server closes after an error; the next request opens a new one
                continue
            queries = texts[item: item + per_request]
            began = time.perf_counter()
            status, answer = post(connection, json.dumps({"query": queries, "prompts": [""] * len(queries)}).encode())
            latencies.append(time.perf_counter() - began)
            if status != 200:
                failures.append(f"good request {item}: {status} {answer}")
            else:
                answers[item] = answer["rewards"]
        connection.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"answers": answers, "latencies": np.array(latencies), "seconds": time.perf_counter() - began,
            "failures": failures, "left": work.qsize()}


@pytest.mark.parametrize("model, per_request, clients", [("demo", 1, CLIENTS), ("demo", 16, CLIENTS), ("demo", 1, 64),
                                                       ("gpt2-small", 1, CLIENTS), ("gpt2-small", 16, CLIENTS),
                                                       ("gpt2-small", 1, 64)])
def test_serve_keeps_up_with_score(demo, model, per_request, clients):
    root, texts = demo
    texts = texts[: 2 * MODELS[model][1]]
    process, address = start_server(root / model)
    try:
        rates, loads = [], []
        for attempt in range(MODELS[model][2]):  # score, then the same texts through the server, side by side
            outputs, rate = score_rate(root, model, f"scores-{model}-{clients}x{per_request}-{attempt}")
            rates.append(rate)
            loads.append(run_load(address, texts, per_request, clients))
        connection = http.client.HTTPConnection(*address, timeout=30)
        connection.request("GET", "/health")
        health = connection.getresponse()
        health = json.loads(health.read())
        assert health["status"] == "ok"
        connection.close()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0, f"minqr serve exited with {code} after SIGTERM"
    for load in loads:
        assert not load["failures"], load["failures"][:5]
        assert load["left"] == 0, f"{load['left']} requests were not sent within {LOAD_TIMEOUT_S} s"
        got = np.full(len(texts), np.nan)
        for start, rewards in load["answers"].items():
            got[start: start + len(rewards)] = rewards
        np.testing.assert_allclose(got, outputs.astype(np.float64).mean(axis=1), rtol=1e-4, atol=1e-4)
    load, rate_of_score = min(loads, key=lambda load: load["seconds"]), max(rates)  # the best of each
    rate = len(texts) / 2 / load["seconds"]
    p50, p99 = np.percentile(load["latencies"], [50, 99]) * 1e3
    print(f"\nserve {model}, {clients} clients, {per_request} queries a request: {rate:,.0f} pairs/s against score's "
          f"{rate_of_score:,.0f} ({rate / rate_of_score:.2f}x, target {TARGET}); latency p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms; {health['texts_scored'] / health['forwards']:.1f} texts a forward; "
          f"{len(load['answers'])} good requests answered, malformed ones refused, healthy, "
          "SIGTERM -> exit 0")
