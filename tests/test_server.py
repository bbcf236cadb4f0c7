"""`minqr serve`: a real HTTP client against the running server. Rewards against each statistic
computed in the test from the model run on each text alone; malformed requests get 4xx JSON and the
server stays alive; concurrent clients get their own answers; the dynamic batcher's batches; SIGTERM
stops a real `minqr serve` process after answering the request in flight."""
import asyncio
import collections
import contextlib
import functools
import http.client
import json
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import SENTENCES, random_gpt2, tiny_config, write_tiny_tokenizer

from minqr import MinqrError, load_tokenizer
from minqr.adapters.batcher import DynamicBatcher
import minqr.adapters.server as server_module
from minqr.adapters.server import RewardServer, RewardService, ServeConfig, serve
from minqr.distribution.statistics import parse_statistic, statistic_values
from minqr.models.head import HeadConfig
from minqr.models.reward import RewardModel
from minqr_cli import commands

MAX_LENGTH = 40  # below the longest query: texts are cut from the left
N = 5
REPLY = " I would rather not say."
PROMPTS = [s.split("\n\nAssistant:")[0] + "\n\nAssistant:" for s in SENTENCES if "\n\nAssistant:" in s]
ANSWERS = [" Yes.", " No, never.", " Paris, of course, and nowhere else " * 3, " A poem: waves and sand.", " Sure!"]


def queries_and_prompts(seed: int, count: int):
    """`count` queries, each a random prompt + a random answer (several share a prompt)."""
    rng = np.random.default_rng(seed)
    prompts = [PROMPTS[i] for i in rng.integers(len(PROMPTS), size=count)]
    return [p + ANSWERS[i] for p, i in zip(prompts, rng.integers(len(ANSWERS), size=count))], prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved mixture model (N = 5, random weights, distinct head rows) with its tokenizer."""
    folder = tmp_path_factory.mktemp("model")
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), layout="tokenizer.json"))
    model = RewardModel(random_gpt2(tiny_config(n_positions=64), seed=3), HeadConfig.make("quantile", N, "mixture"))
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(3)))
    model.save_pretrained(folder, tokenizer=tokenizer, training_args={"max_length": MAX_LENGTH})
    return folder


@pytest.fixture(scope="module")
def alone(folder):
    """text -> the model's raw outputs [N] on that text run by itself (cut from the left), float64."""
    model, tokenizer = RewardModel.from_pretrained(folder), load_tokenizer(folder)

    @functools.cache
    def one(text):
        with torch.no_grad():
            return model(torch.tensor([tokenizer.encode(text)[-MAX_LENGTH:]]))[0].double()

    return lambda texts: torch.stack([one(t) for t in texts])  # [M, N]


@contextlib.contextmanager
def running(folder, **options):
    """A RewardServer on a free localhost port, serving in a thread."""
    server = RewardServer(RewardService(ServeConfig(model=str(folder), **options)), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=30)
        server.close()


def request(server, method, path, body=None, headers=None):
    """(status, JSON answer) of one request on a fresh connection."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def get_reward(server, payload):
    return request(server, "POST", "/get_reward", json.dumps(payload).encode(), {"Content-Type": "application/json"})


@pytest.mark.parametrize("statistic", ["mean", "quantile:0.2", "cvar:0.25", "mean_minus_std:1.0", "preference"])
@pytest.mark.parametrize("reference", ["reply", "group"])
def test_rewards_are_the_statistic_of_the_models_outputs(folder, alone, statistic, reference):
    queries, prompts = queries_and_prompts(seed=len(statistic), count=12)
    if reference == "group":  # every prompt at least twice, the request's rows in a shuffled order
        queries, prompts = queries + [p + " Well." for p in prompts], prompts + prompts
        order = np.random.default_rng(1).permutation(len(queries))
        queries, prompts = [queries[i] for i in order], [prompts[i] for i in order]
    options = {"reference_reply": REPLY} if reference == "reply" else {"group": True}
    with running(folder, statistic=statistic, **options) as server:
        status, answer = get_reward(server, {"query": queries, "prompts": prompts, "labels": [None] * len(queries)})
    assert status == 200, answer
    outputs = alone(queries)  # [M, N]
    if reference == "reply":
        where = {"reference": alone([p + REPLY for p in prompts])}
    else:
        where = {"group": torch.tensor([PROMPTS.index(p) for p in prompts])}
    expected = statistic_values(parse_statistic(statistic), outputs, **where, objective="mixture")
    np.testing.assert_allclose(answer["rewards"], expected.numpy(), rtol=1e-5, atol=1e-5)
    assert answer["scores"] == answer["rewards"]
    # the extra logs, written out: the outputs relative to the reference, kind by kind (a mixture's)
    if reference == "reply":
        relative = outputs - where["reference"]
    else:
        relative = torch.stack([outputs[i] - outputs[[j for j in range(len(prompts)) if prompts[j] == prompts[i]]]
                                .mean(0) for i in range(len(prompts))])
    np.testing.assert_allclose(answer["extra_logs"]["mean"], relative.mean(-1).numpy(), rtol=1e-5, atol=1e-5)
    spread = ((relative - relative.mean(-1, keepdim=True)) ** 2).mean(-1).sqrt()
    np.testing.assert_allclose(answer["extra_logs"]["spread"], spread.numpy(), rtol=1e-5, atol=1e-5)
    # the answer depends on the reference: another one would not meet the expectation
    assert not np.allclose(answer["rewards"], statistic_values(statistic, outputs, reference=outputs.roll(1, 0),
                                                               objective="mixture").numpy(), atol=1e-3)


def test_a_prompts_reference_is_scored_once_across_requests(folder, alone):
    queries, prompts = queries_and_prompts(seed=21, count=8)
    expected = statistic_values("cvar:0.3", alone(queries), reference=alone([p + REPLY for p in prompts])).numpy()
    with running(folder, statistic="cvar:0.3", reference_reply=REPLY) as server:
        got = [get_reward(server, {"query": [q], "prompts": [p]})[1]["rewards"][0] for q, p in zip(queries, prompts)]
        scored = server.service.batcher.texts_scored
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert scored == len(queries) + len(set(prompts)) < 2 * len(queries)  # one request at a time: no dedup


def test_the_mean_needs_no_reference_nor_prompts(folder, alone):
    queries, _ = queries_and_prompts(seed=0, count=5)
    with running(folder) as server:
        status, answer = get_reward(server, {"query": queries})
    assert status == 200 and answer["extra_logs"] == {"mean": answer["rewards"]}  # no spread without a reference
    np.testing.assert_allclose(answer["rewards"], alone(queries).mean(-1).numpy(), rtol=1e-5, atol=1e-5)


def test_a_scalar_heads_preference_is_the_sigmoid_of_the_reward_difference(tmp_path, folder):
    model = RewardModel(random_gpt2(tiny_config(n_positions=64), seed=5), HeadConfig.make("scalar"))
    model.save_pretrained(tmp_path / "scalar", tokenizer=load_tokenizer(folder),
                          training_args={"max_length": MAX_LENGTH})
    queries, prompts = queries_and_prompts(seed=11, count=6)
    with running(tmp_path / "scalar", statistic="preference", reference_reply=REPLY) as server:
        status, answer = get_reward(server, {"query": queries, "prompts": prompts})
    assert status == 200, answer
    tokenizer = load_tokenizer(folder)
    with torch.no_grad():
        reward = [model(torch.tensor([tokenizer.encode(t)[-MAX_LENGTH:]]))[0, 0].item() for t in queries]
        reference = [model(torch.tensor([tokenizer.encode(p + REPLY)[-MAX_LENGTH:]]))[0, 0].item() for p in prompts]
    expected = [1 / (1 + np.exp(r0 - r)) for r, r0 in zip(reward, reference)]
    np.testing.assert_allclose(answer["rewards"], expected, rtol=1e-5, atol=1e-6)


def test_openrlhfs_own_client_gets_the_rewards(folder, alone):
    """The code OpenRLHF (0.11) runs to ask a remote reward model, where it imports: it needs the
    openrlhf package without its dependencies (`pip install --no-deps openrlhf`) and aiohttp and
    pylatexenc beside it; elsewhere this test skips."""
    agent = pytest.importorskip("openrlhf.utils.agent", reason="OpenRLHF's client (openrlhf.utils.agent) is absent")
    queries, prompts = queries_and_prompts(seed=9, count=4)
    with running(folder, statistic="cvar:0.5", reference_reply=REPLY) as server:
        executor = agent.SingleTurnAgentExecutor(f"{server.url}/get_reward")
        together = asyncio.run(executor._fetch_rewards_via_http(queries, prompts, [None] * len(queries)))
        # as a rollout asks: one query a request, many at once
        async def one_each():
            return await asyncio.gather(*[executor._fetch_rewards_via_http([q], [p], [None])
                                          for q, p in zip(queries, prompts)])
        alone_each = asyncio.run(one_each())
    outputs, reference = alone(queries), alone([p + REPLY for p in prompts])
    expected = statistic_values("cvar:0.5", outputs, reference=reference).numpy()
    mean = statistic_values("mean", outputs, reference=reference).numpy()
    (answer,) = together
    np.testing.assert_allclose(answer["rewards"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(answer["scores"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(answer["extra_logs"]["mean"], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([a["rewards"] for (a,) in alone_each], expected[:, None], rtol=1e-5, atol=1e-5)


def raw(server, data: bytes, close_after_send=False) -> bytes:
    """Send bytes on a raw socket and read the answer until the server closes (b'' if none)."""
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(data)
        if close_after_send:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


BAD_BODIES = [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"query": ' + b"[" * 1500, "not JSON (nested deeper than 100 levels"),  # once a RecursionError
    (b'{"prompts": ["a"]}', "no 'query'"),
    (b'{"query": "a text"}', "list of strings"),
    (b'{"query": [1]}', "must be a string"),
    (b'{"query": []}', "empty"),
    (b'{"query": [""]}', "empty string"),
    (b'{"query": ["a b"], "prompts": ["a", "b"]}', "one prompt a query"),
    (b'{"query": ["a b"], "prompts": "a"}', "list of strings"),
    (b'{"query": ["a b"], "prompts": ["b"]}', "does not start with"),
    (b'{"query": ["a b"]}', "no 'prompts'"),  # the server's statistic needs a reference
    (b'{"query": ["a b", "a c"], "prompts": ["a", "x"]}', "does not start with"),
    (b'{"query": ["a b", "x c"], "prompts": ["a", "x"]}', "no other query"),  # --group, a prompt alone
    (b'{"query": ["a \\ud800 b"], "prompts": ["a"]}', "'query'[0] holds a lone surrogate"),  # no tokenizer takes it
    (b'{"query": ["a b"], "prompts": ["\\udfff"]}', "'prompts'[0] holds a lone surrogate"),
]


def test_bad_requests_get_4xx_json_and_the_server_lives_on(folder):
    with running(folder, statistic="cvar:0.5", group=True, max_request_bytes=2000) as server:
        for body, words in BAD_BODIES:
            status, answer = request(server, "POST", "/get_reward", body)
            assert status == 400 and words in answer["error"], (body, answer)
        status, answer = request(server, "POST", "/get_reward", json.dumps({"query": ["x" * 3000]}).encode())
        assert status == 413 and "--max-request-bytes" in answer["error"]
        assert request(server, "GET", "/nowhere")[0] == 404
        assert request(server, "POST", "/health", b"{}")[0] == 404
        status, answer = request(server, "PUT", "/get_reward", b"{}")
        assert status == 501 and "error" in answer
        status, answer = request(server, "GET", "/get_reward")
        assert status == 405 and answer["error"] == "/get_reward takes POST, with the queries in a JSON body"
        # by hand: no Content-Length, a Content-Length that is no number, a body cut short, garbage
        for data, status_line in [(b"POST /get_reward HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
                                  (b"POST /get_reward HTTP/1.1\r\nContent-Length: -3\r\n\r\n", b"400"),
                                  # a digit to str.isdigit(), not to int(): "²" in latin-1
                                  (b"POST /get_reward HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", b"400"),
                                  (b"POST /get_reward HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
                                   b"400"),
                                  (b"POST /get_reward HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}", b"400"),
                                  (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
                                  (b"GET /health HTTP/2.0\r\n\r\n", b"505")]:
            answer = raw(server, data, close_after_send=True)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == status_line and "error" in json.loads(body), answer
        # a client that connects and sends nothing, then goes: nothing to answer, nothing hangs
        assert raw(server, b"", close_after_send=True) == b""
        queries = ["\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b"]
        status, answer = get_reward(server, {"query": queries, "prompts": ["\n\nHuman: hi\n\nAssistant:"] * 2})
        assert status == 200 and len(answer["rewards"]) == 2
        status, health = request(server, "GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["num_outputs"] == N


def test_a_model_that_gives_nan_fails_the_request_with_500_not_the_server(tmp_path, folder):
    model = RewardModel.from_pretrained(folder)
    with torch.no_grad():  # the backbone's last norm: every output NaN, the head as saved
        model.transformer.ln_f.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "broken", tokenizer=load_tokenizer(folder))
    with running(tmp_path / "broken") as server:
        status, answer = get_reward(server, {"query": ["\n\nHuman: hi"]})
        assert status == 500 and "NaN" in answer["error"]
        assert request(server, "GET", "/health")[0] == 200


def test_a_nan_output_fails_its_own_request_not_the_others_of_its_forward(folder):
    """Two requests share a forward whose outputs hold NaN in one text's row (an overflow in half
    precision, say): that request fails, naming its query, and the other is answered. (On the
    model, texts packed into one row with a NaN text turn NaN too: masked attention multiplies its
    values by 0, and 0 times NaN is NaN.)"""
    service = RewardService(ServeConfig(model=str(folder)))
    try:
        texts = ["\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: yo\n\nAssistant: b", "\n\nHuman: hey\n\nAssistant: c"]
        requests = [service.prepare(json.dumps({"query": queries}).encode()) for queries in (texts[:1], texts[1:])]
        outputs = service.batcher.score([tokens for r in requests for tokens in r.token_lists])  # one forward
        outputs[2, 1] = np.nan  # the second request's second query
        assert len(service.finish(requests[0], outputs[:1])["rewards"]) == 1
        with pytest.raises(MinqrError, match=r"gives NaN or infinite outputs for 'query'\[1\] \(1 of this "
                                             r"request's texts\).*serve with --dtype float32"):
            service.finish(requests[1], outputs[1:])
    finally:
        service.close()


def test_concurrent_clients_get_their_own_answers(folder, alone):
    rounds, clients = 4, 8
    work = {(c, r): queries_and_prompts(seed=100 * c + r, count=1 + (c + r) % 5) for c in range(clients)
            for r in range(rounds)}
    answers, start = {}, threading.Barrier(clients)
    with running(folder, reference_reply=REPLY, statistic="quantile:0.5", max_batch=8) as server:
        def client(c):
            connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)  # keep-alive
            start.wait()
            for r in range(rounds):
                queries, prompts = work[c, r]
                connection.request("POST", "/get_reward", json.dumps({"query": queries, "prompts": prompts}))
                answers[c, r] = json.loads(connection.getresponse().read())["rewards"]
            connection.close()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert set(answers) == set(work)
    for key, (queries, prompts) in work.items():
        expected = statistic_values("quantile:0.5", alone(queries), reference=alone([p + REPLY for p in prompts]))
        np.testing.assert_allclose(answers[key], expected.numpy(), rtol=1e-5, atol=1e-5, err_msg=str(key))


def test_a_burst_of_new_connections_is_answered_every_one(folder):
    """OpenRLHF opens a new connection for every request, a rollout's worth at once: the server's
    backlog of connections not yet accepted must hold them (the standard library's default is 5)."""
    clients, statuses = 96, []
    start = threading.Barrier(clients)
    with running(folder) as server:
        def client():
            start.wait()
            try:
                statuses.append(get_reward(server, {"query": ["\n\nHuman: hi\n\nAssistant: hello"]})[0])
            except OSError as error:
                statuses.append(repr(error))
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert statuses == [200] * clients, collections.Counter(map(str, statuses))


def test_the_batcher_scores_what_queued_during_a_forward_in_one_forward():
    release, calls = threading.Event(), []

    def score(token_lists):  # outputs [M, 2]: each text's first token and its length
        calls.append([list(t) for t in token_lists])
        if len(calls) == 1:
            release.wait(timeout=30)
        return np.array([[t[0], len(t)] for t in token_lists], dtype=np.float32)

    batcher = DynamicBatcher(score, max_batch=6)
    first = batcher.submit([[9]])
    while not calls:  # the first forward is running, and waits
        time.sleep(0.001)
    requests = [[[1, 1], [2]], [[3, 3, 3]], [[1, 1], [4]], [[5]] * 7, [[6]]]
    futures = [batcher.submit(r) for r in requests]
    release.set()
    results = [f.result(timeout=30) for f in [first, *futures]]
    batcher.close()
    for got, sent in zip(results, [[[9]], *requests]):
        np.testing.assert_array_equal(got, [[t[0], len(t)] for t in sent])
    # the second forward took the three requests that fit in 6 texts, the identical [1, 1] once; the
    # request of 7 texts went alone, though larger than max_batch; then the last one
    assert calls == [[[9]], [[1, 1], [2], [3, 3, 3], [4]], [[5]], [[6]]]
    assert batcher.forwards == 4 and batcher.texts_scored == 7


def test_a_failed_forward_fails_its_requests_only():
    def score(token_lists):
        if any(t == [0] for t in token_lists):
            raise RuntimeError("broken batch")
        return np.ones((len(token_lists), 1))

    batcher = DynamicBatcher(score, max_batch=1)
    bad, good = batcher.submit([[0]]), batcher.submit([[1]])
    with pytest.raises(RuntimeError, match="broken batch"):
        bad.result(timeout=30)
    assert good.result(timeout=30).tolist() == [[1.0]]
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([[1]])


def test_a_request_that_overflows_does_not_poison_the_others_of_its_forward():
    """Texts packed into one forward share rows, and a NaN in one text's states reaches its
    row-mates through the attention (a masked weight times NaN is NaN): a healthy request that
    shared a forward with one that overflows gets its own outputs, as scored alone."""
    from minqr.study.scoring import score_texts

    model = RewardModel(random_gpt2(tiny_config(), seed=1), HeadConfig.make("quantile", 4)).eval()
    with torch.no_grad():
        model.transformer.wte.weight[7] = float("inf")  # token 7 overflows whatever it meets
    healthy, poisoned = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]], [[8, 9, 7, 10], [8, 9, 7, 11]]
    shared = score_texts(model, healthy + poisoned, check_finite=False)
    assert np.isnan(shared[:2]).all()  # the hazard itself: one forward of both poisons the healthy texts
    release, calls = threading.Event(), []

    def score(token_lists):
        calls.append(len(token_lists))
        if len(calls) == 1:
            release.wait(timeout=30)
        return score_texts(model, token_lists, check_finite=False)

    batcher = DynamicBatcher(score, max_batch=32)
    first = batcher.submit([[1, 2]])
    while not calls:  # the first forward is running, and waits: the next two queue up together
        time.sleep(0.001)
    good, bad = batcher.submit(healthy), batcher.submit(poisoned)
    release.set()
    first.result(timeout=30)
    np.testing.assert_allclose(good.result(timeout=30), score_texts(model, healthy), rtol=1e-5, atol=1e-6)
    assert np.isnan(bad.result(timeout=30)).all()  # its own error (the service refuses it by name)
    batcher.close()
    assert calls == [1, 4, 2, 2]  # the shared forward, then each request in one of its own


@pytest.mark.parametrize("options, words", [
    ({"statistic": "cvar:0.25"}, "needs a reference"),
    ({"statistic": "median"}, "unknown statistic"),
    ({"statistic": "cvar:2"}, "level"),
    ({"reference_reply": "x", "group": True}, "give one"),
    ({"reference_reply": "  "}, "empty"),
])
def test_a_server_that_cannot_serve_its_statistic_does_not_start(folder, options, words):
    with pytest.raises(MinqrError, match=words):
        RewardService(ServeConfig(model=str(folder), **options))


def test_the_command_line_says_what_is_wrong(folder, tmp_path):
    result = CliRunner().invoke(commands.main, ["serve", "--model", str(folder), "--statistic", "preference"])
    assert result.exit_code == 1 and "Error:" in result.output and "needs a reference" in result.output
    result = CliRunner().invoke(commands.main, ["serve", "--model", str(tmp_path / "absent")])
    assert result.exit_code == 1 and "Error:" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(commands.main, ["serve", "--model", str(folder), "--port", str(port)])
    assert result.exit_code == 1 and f"--port {port}" in result.output


def test_an_early_error_reaches_a_client_still_sending_its_body(folder):
    """A body over the limit is answered 413 before it is read; the server reads and drops the rest
    before closing, so that a client still sending it gets the answer rather than a reset. A
    Content-Length of thousands of digits is a 413 too (int() refuses past 4,300 digits)."""
    with running(folder, statistic="mean", max_request_bytes=1000) as server:
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        connection.request("POST", "/get_reward", body=b"x" * (8 << 20))  # 8 MB: far more than a socket buffer
        response = connection.getresponse()
        assert response.status == 413 and "more than the server's limit of 1,000" in json.loads(response.read())["error"]
        connection.close()
        answer = raw(server, b"POST /get_reward HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
                     close_after_send=True)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"413"
        assert json.loads(body)["error"] == ("the body has a Content-Length of 5,000 digits, more than the server's "
                                             "limit of 1,000 (--max-request-bytes): send fewer queries")
        # leading zeros count for nothing: 5,000 of them and a 5 is a body of 5 bytes, here cut short
        answer = raw(server, b"POST /get_reward HTTP/1.1\r\nContent-Length: " + b"0" * 5000 + b"5\r\n\r\n{}",
                     close_after_send=True)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400" and json.loads(body)["error"] == "the body ended after 2 of 5 bytes"
        assert request(server, "GET", "/health")[0] == 200


def test_a_reference_reply_no_tokenizer_takes_is_refused_at_start(folder):
    with pytest.raises(MinqrError, match=r"--reference-reply holds a lone surrogate '\\udcff' at character 3"):
        ServeConfig(model=str(folder), statistic="cvar:0.25", reference_reply=" ok\udcff")


def test_stop_cuts_a_request_that_never_finishes_arriving(folder, monkeypatch):
    """A client that sent headers and part of its body, then stalls, has STOP_GRACE_S after stop()
    to finish; then its connection is cut and the server closes, instead of waiting for it."""
    monkeypatch.setattr(server_module, "STOP_GRACE_S", 0.5)
    server = RewardServer(RewardService(ServeConfig(model=str(folder), statistic="mean")), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    with socket.create_connection(server.server_address[:2], timeout=30) as stalled:
        stalled.sendall(b"POST /get_reward HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"query\"")
        time.sleep(0.2)  # the server is reading the body
        started = time.monotonic()
        server.stop()
        thread.join(timeout=30)
        server.close()  # joins the connection threads: returns once the stalled one is cut
        assert time.monotonic() - started < 10
        assert b" 400 " in stalled.recv(65536).split(b"\r\n")[0]  # told its body ended early


@pytest.mark.slow  # a real server process started and stopped: about 3.5 s of CPU
def test_sigterm_answers_the_request_in_flight_then_exits_0(folder, alone):
    command = [sys.executable, "-c", "from minqr_cli.commands import main; main()", "serve", "--model", str(folder),
               "--port", "0", "--max-batch", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        found = None
        while found is None:
            line = lines.get(timeout=120)
            found = re.search(r"http://([\d.]+):(\d+)/", line)
        address = found[1], int(found[2])
        idle = http.client.HTTPConnection(*address, timeout=30)  # a keep-alive connection left idle
        idle.request("GET", "/health")
        assert idle.getresponse().read()
        # many texts, a forward each: the answer takes a while, and SIGTERM comes before it
        queries, _ = queries_and_prompts(seed=5, count=4000)
        busy = http.client.HTTPConnection(*address, timeout=120)
        busy.request("POST", "/get_reward", json.dumps({"query": queries}))
        time.sleep(0.05)  # the server has read the request
        assert not select.select([busy.sock], [], [], 0)[0], "answered before SIGTERM: make the request larger"
        process.send_signal(signal.SIGTERM)
        response = busy.getresponse()
        assert response.status == 200
        rewards = np.array(json.loads(response.read())["rewards"])
        assert rewards.shape == (len(queries),)
        checked = np.random.default_rng(0).choice(len(queries), 200, replace=False)  # the reference is slow
        np.testing.assert_allclose(rewards[checked], alone([queries[i] for i in checked]).mean(-1).numpy(),
                                   rtol=1e-5, atol=1e-5)
        assert process.wait(timeout=120) == 0
        idle.close()
    finally:
        if process.poll() is None:
            process.kill()
    output = []
    while not lines.empty():
        output.append(lines.get())
    assert "stopped\n" in output and not any("Traceback" in line for line in output), output


def test_an_ignored_sigint_stays_ignored_and_sigterm_still_stops_the_server(folder):
    """In this process: a server started with SIGINT ignored (a script's background job) leaves it
    ignored while it serves, takes SIGTERM, and restores both handlers when it stops."""
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def ready(message):  # the server listens: look at the handlers, then ask it to stop
        seen.update(sigint=signal.getsignal(signal.SIGINT), sigterm=signal.getsignal(signal.SIGTERM))
        signal.raise_signal(signal.SIGINT)  # ignored: the server goes on
        signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve(ServeConfig(model=str(folder), port=0), ready=ready)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen["sigint"] == signal.SIG_IGN and callable(seen["sigterm"]) and seen["sigterm"] != before
    assert signal.getsignal(signal.SIGTERM) == before
