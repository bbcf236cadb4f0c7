"""`minqr serve` gives one person's reward: --annotator for every query, or a request's `annotators`
list (null: the population), against float64 sums written out here from the model run on each text
alone; unknown annotators get a 400 (a server started for one does not start)."""
import math
import re
import shutil

import numpy as np
import pytest
import torch
from test_server import REPLY, alone, folder, get_reward, queries_and_prompts, request, running  # noqa: F401

from minqr import MinqrError
from minqr.adapters.server import RewardService, ServeConfig
from minqr.distribution.personal import Annotators

N = 5


@pytest.fixture(scope="module")
def people_folder(folder, tmp_path_factory):  # noqa: F811
    """A copy of the served model with two annotators, "ann" and 12, saved beside it."""
    copy = tmp_path_factory.mktemp("people") / "model"
    shutil.copytree(folder, copy)
    log_q = torch.log_softmax(torch.randn(2, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2, -1)
    Annotators(("ann", 12), log_q, (4, 4)).save(copy)
    return copy, {"ann": log_q[0].exp().tolist(), 12: log_q[1].exp().tolist(), None: [1 / N] * N}


def personal_preference(outputs, references, weights):
    """Per query: sum_k q_k sigma(h_k(query) - h_k(prompt + REPLY))."""
    return [sum(q / (1 + math.exp(-(h - r))) for q, h, r in zip(w, hs, rs))
            for w, hs, rs in zip(weights, outputs.tolist(), references.tolist())]


def test_one_annotator_for_the_server_and_one_a_query(people_folder, alone):  # noqa: F811
    path, people = people_folder
    queries, prompts = queries_and_prompts(seed=31, count=6)
    outputs, references = alone(queries), alone([p + REPLY for p in prompts])
    with running(path, statistic="preference", reference_reply=REPLY, annotator="12") as server:
        status, answer = get_reward(server, {"query": queries, "prompts": prompts})
        assert status == 200, answer
        np.testing.assert_allclose(answer["rewards"], personal_preference(outputs, references, [people[12]] * 6),
                                   rtol=1e-5, atol=1e-6)
        names = ["ann", None, 12, "ann", None, "12"]  # a request's list wins; null: the population
        status, answer = get_reward(server, {"query": queries, "prompts": prompts, "annotators": names})
        assert status == 200, answer
        weights = [people[{"12": 12}.get(name, name)] for name in names]
        np.testing.assert_allclose(answer["rewards"], personal_preference(outputs, references, weights),
                                   rtol=1e-5, atol=1e-6)
        population = personal_preference(outputs, references, [people[None]] * 6)
        assert not np.allclose(answer["rewards"], population, atol=1e-4)  # a person's reward is another reward
        status, health = request(server, "GET", "/health")
        assert health["annotator"] == "12" and health["known_annotators"] == 2
        for bad, words in ((["zoe"] * 6, "'annotators': annotator 'zoe' is not known"),
                           (["ann"] * 5, "one a query"), ([1.5] * 6, "'annotators'\\[0\\] must be a string")):
            status, answer = get_reward(server, {"query": queries, "prompts": prompts, "annotators": bad})
            assert status == 400 and re.search(words, answer["error"]), answer


def test_a_server_for_an_unknown_annotator_does_not_start(people_folder, folder):  # noqa: F811
    path, _ = people_folder
    with pytest.raises(MinqrError, match="--annotator zoe: annotator 'zoe' is not known"):
        RewardService(ServeConfig(model=str(path), annotator="zoe"))
    with pytest.raises(MinqrError, match="--annotator ann: annotator 'ann' is not known"):
        RewardService(ServeConfig(model=str(folder), annotator="ann"))  # a model with no annotators.json
