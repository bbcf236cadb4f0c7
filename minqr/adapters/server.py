"""`minqr serve`: a reward model behind HTTP, for RL trainers that ask a server for rewards
(OpenRLHF's remote reward model; the protocol is in minqr/adapters/openrlhf.py).

    minqr serve --model runs/demo/mixture --statistic cvar:0.25 --reference-reply " OK." --port 5000
    # OpenRLHF: --reward.remote_url http://127.0.0.1:5000/get_reward

    POST /get_reward  {"query": [...], "prompts": [...]}  ->  {"rewards": [...], "scores": [...], "extra_logs": {...}}
    GET  /health      ->  {"status": "ok", "model": ..., "statistic": ..., ...}

Each query's reward is one statistic of the distribution the model gives it (minqr/distribution/
statistics.py): the mean, or a risk-aware one (a quantile, the lower tail's CVaR, mean - λ·std,
the preference probability over a reference). All but the mean need a reference for the prompt
(a mixture head's kinds each have a free constant that only a reference cancels): either a fixed
reply, `--reference-reply TEXT`, scored as the reply to each query's prompt (the text is prompt +
TEXT), or `--group`, the queries of one request that share a prompt (GRPO's G samples, sent
together), each relative to their group's mean output.

How it serves: connections are handled by threads (the standard library's ThreadingHTTPServer);
each request is parsed, checked and tokenised in its own thread, then its texts join the queue of
one worker thread that owns the model (minqr/adapters/batcher.py), so that requests arriving
together share a forward pass, and the samples of one prompt in it run the prompt once. Texts are
cut from the left to the model's length, as `minqr score` cuts them. A bad request gets a 4xx JSON
answer `{"error": "..."}` and the server carries on; SIGTERM or Ctrl-C stops accepting, answers the
requests already received, and exits 0.

Whose reward: the population's, unless `--annotator ID` serves one person's (the statistic with the
mixture's kinds weighted by their posterior saved with the model, minqr personalize), or a request
names one per query in its `annotators` list (null: the population). An annotator the model does not
know stops the server at start, or gets the request a 400.
"""
import collections
import functools
import json
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from minqr.adapters.batcher import DynamicBatcher
from minqr.adapters.openrlhf import (HEALTH_PATH, REWARD_PATH, BadRequest, RewardRequest, parse_request,
                                     reward_response)
from minqr.adapters.texts import key_ids
from minqr.data.pairs import check_encodable
from minqr.device import DTYPES, resolve_device
from minqr.distribution.personal import Annotators, posterior_weights
from minqr.distribution.statistics import (lone_member, mean_and_spread, parse_statistic, relative_outputs,
                                           statistic_values)
from minqr.errors import MinqrError
from minqr.models.reward import load_reward_model
from minqr.options import check_options, option
from minqr.study.scoring import score_texts, text_length_limit

REFERENCE_CACHE_SIZE = 4096  # prompts whose reference outputs (--reference-reply) are kept
IDLE_TIMEOUT_S = 120.0  # a connection that sends nothing for this long is closed (a stalled client holds a thread)
STOP_GRACE_S = 5.0  # on stop, how long a request still arriving may take before its connection is cut
# after an early error answer (413, 411, ...), the unread body read and dropped, at most this much and this
# long, so that the client gets the answer (closing with data unread would reset the connection first)
DRAIN_BYTES, DRAIN_S = 64 << 20, 2.0
IDLE, READING, ANSWERING = "idle", "reading", "answering"  # a connection's state, for stop()


@dataclass
class ServeConfig:
    """The options of `minqr serve`."""

    model: str = option(help="reward model folder (train's --out), or a hub name")
    statistic: str = option("mean", help="each query's reward: mean, quantile:TAU, cvar:ALPHA (the lower tail), "
                            "mean_minus_std:LAMBDA or preference (P(query's response beats the reference)); all but "
                            "mean need --reference-reply or --group")
    reference_reply: str | None = option(None, "the reference: this text scored as the reply to each query's "
                                         "prompt (prompt + TEXT); rewards are relative to it")
    group: bool = option(False, "the reference: the mean output of the queries of the same request with the same "
                         "prompt (send a prompt's G samples in one request)")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(5000, "port to listen on (0: any free one, printed at start)", low=0, high=65535)
    max_batch: int = option(32, "texts a forward pass at most: concurrent requests are batched up to this", low=1)
    max_length: int | None = option(None, "tokens kept of each text, cut from the left [default: the --max-length "
                                    "the model was trained with, else its number of positions]", low=1)
    max_request_bytes: int = option(16 << 20, "largest request body accepted (a larger one gets 413)", low=1)
    device: str = option("auto", "cpu, cuda, cuda:1, ...; auto: cuda when there is a GPU")
    dtype: str = option("auto", "compute precision; auto: bfloat16 autocast on GPU, float32 on CPU", DTYPES)
    annotator: str | None = option(None, "serve this annotator's reward (one the model knows: minqr personalize), "
                                   "the kinds weighted by their posterior; a request's 'annotators' list wins")

    def __post_init__(self):
        check_options(self)  # every range and choice the fields declare
        if self.reference_reply is not None and self.group:
            raise MinqrError("--reference-reply and --group are two references: give one")
        if self.reference_reply is not None and not self.reference_reply.strip():
            raise MinqrError("--reference-reply is empty: give the text of a reply, e.g. ' OK.'")
        if self.reference_reply is not None:
            check_encodable(self.reference_reply, "--reference-reply")


@dataclass
class Scoring:
    """One request on its way through the server: its texts as token lists (its queries', then the
    references of the prompts not in the cache), and the cached references of the others."""

    request: RewardRequest
    token_lists: list
    cached: dict  # prompt -> reference outputs [N], float64
    missing: list  # the prompts whose references follow the queries in token_lists, in that order
    weights: torch.Tensor | None = None  # [M, N] whose reward each query's is (None: the population's)


class RewardService:
    """The model, its tokenizer and the statistic: request bodies in, answers out (thread-safe)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        try:
            self.statistic = parse_statistic(config.statistic)
        except MinqrError as error:
            raise MinqrError(f"--statistic: {error}") from None
        self.model, self.tokenizer, self.folder = load_reward_model(config.model)
        self.max_length = text_length_limit(self.model, self.folder, config.max_length)
        self.objective = self.model.head_config.objective
        self.annotators = Annotators.load(self.folder, self.model.num_quantiles)
        if config.annotator is not None:
            try:
                posterior_weights(self.annotators, self.model.head_config, [config.annotator])
            except MinqrError as error:
                raise MinqrError(f"--annotator {config.annotator}: {error}") from None
        try:
            self._check_statistic()
        except MinqrError as error:
            raise MinqrError(f"--statistic {config.statistic}: {error}. Serve with --reference-reply TEXT or "
                             "--group") from None
        device = resolve_device(config.device)
        self.model.to(device)
        # non-finite outputs fail the request they belong to (finish), not every request of the forward
        score = functools.partial(score_texts, self.model, batch_size=config.max_batch, device=device,
                                  dtype=config.dtype, check_finite=False)
        self.batcher = DynamicBatcher(score, config.max_batch)
        # the model never changes while it serves, so a prompt's reference is scored once while its
        # samples arrive, request after request
        self._references = collections.OrderedDict()  # prompt -> reference outputs [N], the latest last
        self._references_lock = threading.Lock()

    @property
    def needs_prompts(self) -> bool:
        return self.config.reference_reply is not None or self.config.group

    def _check_statistic(self) -> None:
        """Compute the statistic once on zeros, with the reference as configured, so that a statistic
        that needs a reference the server was not given stops it at start, not at every request."""
        zeros = torch.zeros(2, self.model.num_quantiles, dtype=torch.float64)  # [2, N]: two samples of one prompt
        self._values(zeros, zeros if self.config.reference_reply is not None else None, ["", ""])

    def _values(self, outputs: torch.Tensor, reference: torch.Tensor | None, prompts,
                weights: torch.Tensor | None = None) -> tuple:
        """(rewards [M], extra logs) of outputs [M, N] (reference [M, N] or None; `weights` [M, N]:
        whose reward, None for the population's). The extra logs are
        those of minqr's verl adapter: "mean", the expected reward, and, where there is a reference,
        "spread", the std over the N relative outputs (without one the kinds' constants are in it)."""
        group = key_ids(prompts) if self.config.group else None  # [M] a prompt's id
        values = statistic_values(self.statistic, outputs, reference=reference, group=group, objective=self.objective,
                                  weights=weights)
        if reference is None and group is None:
            return values.tolist(), {"mean": values.tolist()}  # the mean itself, or at N = 1 the one reward
        relative = relative_outputs(outputs, reference=reference, group=group, objective=self.objective)  # [M, N]
        mean, spread = mean_and_spread(relative, weights)  # the person's, where the reward is a person's
        return values.tolist(), {"mean": mean.tolist(), "spread": spread.tolist()}

    def prepare(self, body: bytes) -> "Scoring":
        """What a POST body asks to score; BadRequest for a body that is not a request."""
        request = parse_request(body, self.needs_prompts)
        if self.config.group:
            alone = lone_member(key_ids(request.prompts))
            if alone is not None:
                raise BadRequest(f"--group: the prompt of 'query'[{alone}] has no other query in this request, so its "
                                 "group reference is itself and its reward says nothing of it: send a prompt's "
                                 "samples in one request, or serve with --reference-reply")
        texts, cached, missing = list(request.queries), {}, []
        if self.config.reference_reply is not None:
            with self._references_lock:
                cached = {prompt: self._references[prompt] for prompt in request.prompts if prompt in self._references}
            missing = list(dict.fromkeys(prompt for prompt in request.prompts if prompt not in cached))
            texts += [prompt + self.config.reference_reply for prompt in missing]
        token_lists = self.tokenizer.encode_batch(texts, self.max_length)
        for i, tokens in enumerate(token_lists[: len(request.queries)]):
            if not tokens:
                raise BadRequest(f"'query'[{i}] has no tokens: a reward is read at a text's last token")
        return Scoring(request, token_lists, cached, missing, self._weights(request))

    def _weights(self, request: RewardRequest) -> torch.Tensor | None:
        """[M, N] whose reward each query's is: the request's annotators, else --annotator's, else None."""
        names = request.annotators
        if names is None and self.config.annotator is not None:
            names = [self.config.annotator] * len(request.queries)
        if names is None:
            return None
        try:
            return posterior_weights(self.annotators, self.model.head_config, names)
        except MinqrError as error:
            raise BadRequest(f"'annotators': {error}") from None

    def finish(self, scoring: "Scoring", outputs) -> dict:
        """The JSON answer from the outputs [len(token lists), N] of the scoring's token lists."""
        outputs = torch.from_numpy(outputs).double()  # [M + references scored, N]
        request, m = scoring.request, len(scoring.request.queries)
        broken = (~torch.isfinite(outputs).all(-1)).nonzero()
        if len(broken):
            first = int(broken[0])
            which = f"'query'[{first}]" if first < m else "the reference reply of one of its prompts"
            raise MinqrError(f"the reward model {self.folder} gives NaN or infinite outputs for {which} ({len(broken)} "
                             "of this request's texts): its weights are broken, or the precision overflows (serve "
                             "with --dtype float32)")
        reference = None
        if self.config.reference_reply is not None:
            fresh = dict(zip(scoring.missing, outputs[m:]))  # prompt -> its reference's outputs [N]
            self._remember(fresh)
            known = {**scoring.cached, **fresh}
            reference = torch.stack([known[prompt] for prompt in request.prompts])  # [M, N]
        return reward_response(*self._values(outputs[:m], reference, request.prompts, scoring.weights))

    def _remember(self, references: dict) -> None:
        """Keep the reference outputs of the latest REFERENCE_CACHE_SIZE prompts."""
        with self._references_lock:
            for prompt, row in references.items():
                self._references[prompt] = row
                self._references.move_to_end(prompt)
            while len(self._references) > REFERENCE_CACHE_SIZE:
                self._references.popitem(last=False)

    def answer(self, body: bytes) -> dict:
        """The JSON answer to a POST body (blocks until its forward is done); BadRequest for a bad one."""
        scoring = self.prepare(body)
        return self.finish(scoring, self.batcher.submit(scoring.token_lists).result())

    def health(self) -> dict:
        head_config = self.model.head_config
        return {"status": "ok", "model": str(self.folder), "statistic": self.config.statistic,
                "reference": ("group" if self.config.group else self.config.reference_reply),
                "head": head_config.head, "objective": head_config.objective,
                "num_outputs": head_config.num_quantiles,
                "max_batch": self.config.max_batch, "max_length": self.max_length, "annotator": self.config.annotator,
                "known_annotators": 0 if self.annotators is None else len(self.annotators.ids),
                "forwards": self.batcher.forwards, "texts_scored": self.batcher.texts_scored}

    def close(self) -> None:
        self.batcher.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's next request reuses its connection
    # an answer to a request line too bad to parse still starts with a status line (HTTP/0.9 has none)
    default_request_version = "HTTP/1.0"
    timeout = IDLE_TIMEOUT_S
    # TCP_NODELAY: an answer's headers and body go out as two writes, and Nagle's algorithm would hold
    # the body until the client's delayed ACK of the headers, 40 ms later
    disable_nagle_algorithm = True
    server: "RewardServer"

    def setup(self):
        super().setup()
        self.server.track(self, IDLE)

    def finish(self):
        self.server.untrack(self)
        super().finish()

    def handle_one_request(self):
        self.server.track(self, IDLE)
        self.unread_body = False
        if self.server.closing:
            self.close_connection = True
            return
        super().handle_one_request()

    def parse_request(self) -> bool:  # the request line is in: its headers and body are arriving
        self.server.track(self, READING)
        return super().parse_request()

    def log_message(self, format, *args):  # no access log: a trainer sends thousands of requests a minute
        pass

    def send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.server.closing or status >= 400:
            # after an error the rest of the stream cannot be trusted (e.g. an unread body)
            self.send_header("Connection", "close")
            self.close_connection = True
        try:
            self.end_headers()
            self.wfile.write(body)
            if status >= 400 and self.unread_body:
                self._drain()
        except OSError:  # the client hung up before its answer (a trainer's timeout): nothing to tell it
            self.close_connection = True

    def _drain(self) -> None:
        """Read and drop what the client still sends (at most DRAIN_BYTES, for DRAIN_S), after the
        answer is out and our side is shut for writing: a socket closed with unread data resets the
        connection, and the client's still-sending write then fails before it reads the answer."""
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_WR)
        self.connection.settimeout(DRAIN_S)
        deadline, dropped = time.monotonic() + DRAIN_S, 0
        try:
            while dropped < DRAIN_BYTES and time.monotonic() < deadline:
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:  # the timeout, or the client gave up: either way nothing more to do
            pass

    def send_error(self, code, message=None, explain=None):  # http.server's own errors (bad request line, ...)
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def do_GET(self):
        self.server.track(self, ANSWERING)
        path = self.path.split("?")[0]
        if path == HEALTH_PATH:
            self.send_json(200, self.server.service.health())
        elif path == REWARD_PATH:
            self.send_json(405, {"error": f"{REWARD_PATH} takes POST, with the queries in a JSON body"})
        else:
            self.send_json(404, {"error": f"no such path {self.path!r}: POST {REWARD_PATH} or GET {HEALTH_PATH}"})

    def do_POST(self):
        self.unread_body = True  # until it is read: an early error answer drops it first (_drain)
        if self.path.split("?")[0] != REWARD_PATH:
            return self.send_json(404, {"error": f"no such path {self.path!r}: POST {REWARD_PATH}"})
        lengths, limit = self.headers.get_all("Content-Length") or [], self.server.service.config.max_request_bytes
        if not lengths:
            return self.send_json(411, {"error": "the request has no Content-Length"})
        if len(set(lengths)) > 1:
            return self.send_json(400, {"error": f"the request has {len(lengths)} Content-Length headers that differ"})
        length = lengths[0].strip()
        if not re.fullmatch(r"[0-9]+", length):  # ASCII digits: str.isdigit() takes "²", which int() refuses
            return self.send_json(400, {"error": f"Content-Length {length!r} is not a number"})
        # no int() of thousands of digits (Python refuses past 4,300): a length that long is too long anyway
        digits = length.lstrip("0") or "0"
        if len(digits) > len(str(limit)) or int(digits) > limit:
            size = f"{int(digits):,} bytes" if len(digits) <= 30 else f"a Content-Length of {len(digits):,} digits"
            return self.send_json(413, {"error": f"the body has {size}, more than the server's limit of {limit:,} "
                                                 "(--max-request-bytes): send fewer queries"})
        try:
            body = self.rfile.read(int(digits))
        except OSError:  # the client went away or stalled past the timeout
            self.close_connection = True
            return
        self.unread_body = False
        self.server.track(self, ANSWERING)
        if len(body) < int(digits):
            return self.send_json(400, {"error": f"the body ended after {len(body)} of {int(digits)} bytes"})
        try:
            answer = self.server.service.answer(body)
        except BadRequest as error:
            return self.send_json(error.status, {"error": str(error)})
        except Exception as error:  # the model failed: the client hears why, the server lives on
            print(f"minqr serve: error answering a request: {error!r}", file=sys.stderr, flush=True)
            return self.send_json(500, {"error": f"the server failed to score the request: {error}"})
        self.send_json(200, answer)


class RewardServer(ThreadingHTTPServer):
    """The HTTP server: one thread a connection, around a RewardService. `stop()` (from any thread but
    the one in serve_forever) stops accepting, lets the requests received be answered, and closes
    idle connections; `serve_forever` then returns and `close()` waits for the last answers."""

    daemon_threads = False  # server_close() joins the connection threads: in-flight requests finish
    allow_reuse_address = True
    # connections waiting to be accepted: OpenRLHF opens one per request, a rollout's worth at once,
    # and the standard library's 5 had the kernel reset 81 of a burst of 96 (measured)
    request_queue_size = socket.SOMAXCONN

    def __init__(self, service: RewardService, host: str, port: int):
        self.service = service
        self.closing = False
        self._connections = {}  # handler -> IDLE, READING or ANSWERING
        self._lock = threading.Lock()
        try:
            super().__init__((host, port), _Handler)
        except OSError as error:
            raise MinqrError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def track(self, handler, state: str) -> None:
        with self._lock:
            self._connections[handler] = state

    def untrack(self, handler) -> None:
        with self._lock:
            self._connections.pop(handler, None)

    def stop(self) -> None:
        self.closing = True
        self.shutdown()  # the accept loop ends
        # a connection waiting for its next request reads end-of-stream and closes now; one whose
        # request is still arriving gets STOP_GRACE_S to finish sending it (a stalled or trickling
        # client would otherwise hold the exit for as long as it likes); answers in progress finish
        self._cut(IDLE)
        timer = threading.Timer(STOP_GRACE_S, self._cut, args=(READING,))
        timer.daemon = True
        timer.start()

    def _cut(self, state: str) -> None:
        """Shut the read side of the connections in `state`: their next read ends the request."""
        with self._lock:
            handlers = [handler for handler, now in self._connections.items() if now == state]
        for handler in handlers:
            try:
                handler.connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def close(self) -> None:
        self.server_close()  # joins the connection threads
        self.service.close()


def serve(config: ServeConfig, ready=functools.partial(print, flush=True)) -> None:
    """Load the model and serve until SIGTERM or SIGINT (Ctrl-C), then answer the requests already
    received and return. `ready(message)` is called once the server listens (the message holds its URL)."""
    service = RewardService(config)
    try:
        server = RewardServer(service, config.host, config.port)
    except MinqrError:
        service.close()
        raise

    def stop(signum, frame):  # shutdown() waits for serve_forever, which runs in this very thread
        threading.Thread(target=server.stop, name="minqr-stop").start()

    # SIGINT ignored from the start (a background job of a script, nohup) stays ignored, as in training
    signals = [sig for sig in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(sig) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        reference = ("each request's group mean" if config.group else
                     f"the reply {config.reference_reply!r}" if config.reference_reply is not None else "none")
        whose = "" if config.annotator is None else f", annotator {config.annotator!r}'s reward"
        ready(f"serving {service.folder} at {server.url}{REWARD_PATH} (statistic {config.statistic}, reference "
              f"{reference}, {service.model.num_quantiles} outputs{whose}); health at {server.url}{HEALTH_PATH}")
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
