"""OpenRLHF's remote reward protocol: what a request holds and what its answer must hold.

OpenRLHF (`--reward.remote_url http://HOST:PORT/get_reward`) POSTs JSON to the URL it is given:

    {"query": [text, ...], "prompts": [text, ...], "labels": [label, ...]}

`query[i]` is a whole text, the prompt followed by the policy's response (its tokens decoded with
their special tokens), `prompts[i]` the prompt alone, so `query[i]` starts with `prompts[i]` and
the response begins where the prompt ends. `labels` are the data set's labels (for rule-based
rewards; a reward model ignores them). Recent versions send one query a request, one request per
sample, many at once; older ones sent a micro-batch of queries. The answer is read as

    {"rewards": [float, ...], "scores": [float, ...], "extra_logs": {name: [float, ...], ...}}

`rewards[i]` is query i's reward (what the advantages are computed from), `scores[i]` what dynamic
filtering reads (falling back to `rewards`), and each `extra_logs` entry one more number per query
to log. A request that is not this shape gets a 4xx answer `{"error": "..."}` saying what is wrong.

minqr adds one optional key, `"annotators": [id or null, ...]`, one per query: whose reward it is
(docs/personal.md), null for the population.
"""
import json
from dataclasses import dataclass

from minqr.data.pairs import check_encodable
from minqr.errors import MinqrError
from minqr.reading import loads

REWARD_PATH = "/get_reward"
HEALTH_PATH = "/health"


class BadRequest(MinqrError):
    """A request the server refuses, with its HTTP status (4xx) and a message for the client."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class RewardRequest:
    queries: list  # [M] str: prompt + response
    prompts: list | None  # [M] str, each the start of its query; None when the request sent none
    annotators: list | None = None  # [M] str, int or None: whose reward; None when the request names nobody


def _texts(data: dict, key: str) -> list:
    texts = data[key]
    if not isinstance(texts, list):
        raise BadRequest(f"'{key}' must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadRequest(f"'{key}'[{i}] must be a string, got {type(text).__name__}")
        try:
            check_encodable(text, f"'{key}'[{i}]")
        except MinqrError as error:
            raise BadRequest(str(error)) from None
    return texts


def parse_request(body: bytes, needs_prompts: bool) -> RewardRequest:
    """The texts of a POST body; BadRequest (400) for anything but the JSON above. `needs_prompts`:
    the reward is relative to a reference for the prompt, so the prompts must be there."""
    try:
        data = loads(body)  # bounded depth: a deeply nested body is a 400 like any malformed one
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"the body is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object with 'query' and 'prompts', got a {type(data).__name__}")
    if "query" not in data:
        raise BadRequest(f"the body has no 'query' (the texts to score); its keys are {sorted(data)}")
    queries = _texts(data, "query")
    if not queries:
        raise BadRequest("'query' is empty: send at least one text")
    for i, query in enumerate(queries):
        if not query:
            raise BadRequest(f"'query'[{i}] is an empty string: a reward is read at a text's last token")
    prompts = None
    if "prompts" in data and data["prompts"] is not None:
        prompts = _texts(data, "prompts")
        if len(prompts) != len(queries):
            raise BadRequest(f"'prompts' has {len(prompts)} texts and 'query' {len(queries)}: one prompt a query")
        for i, (query, prompt) in enumerate(zip(queries, prompts)):
            if not query.startswith(prompt):
                raise BadRequest(f"'query'[{i}] does not start with 'prompts'[{i}]: a query is its prompt followed "
                                 "by the response")
    elif needs_prompts:
        raise BadRequest("the body has no 'prompts': this server's rewards are relative to a reference for each "
                         "prompt, so it needs each query's prompt")
    annotators = data.get("annotators")
    if annotators is not None:
        if not isinstance(annotators, list) or len(annotators) != len(queries):
            raise BadRequest(f"'annotators' must be a list of {len(queries)} ids (strings, integers or null), one a "
                             "query")
        for i, name in enumerate(annotators):
            if not (name is None or isinstance(name, str) or (isinstance(name, int) and not isinstance(name, bool))):
                raise BadRequest(f"'annotators'[{i}] must be a string, an integer or null, got {type(name).__name__}")
    return RewardRequest(queries, prompts, annotators)


def reward_response(rewards: list, extra_logs: dict) -> dict:
    """The answer to a request: `rewards` [M] floats, `extra_logs` {name: [M] floats}."""
    return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs}
