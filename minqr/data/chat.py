"""Chat templates: a conversation (a list of {"role", "content"} messages) as the text a chat model
reads, rendered with the model's own Jinja template (minqr/models/chat_template.py, which the
tokenizer carries).

`render_pair` gives the two texts of a preference pair and where their final responses start:
with the template for a pair given as message lists throughout (`Pair.conversation`), as they are
otherwise (strings, and the HH-style text of pairs that mix strings and messages).
"""
from contextlib import contextmanager

import jinja2

from minqr.data.pairs import Conversation
from minqr.errors import MinqrError
from minqr.models.chat_template import ChatTemplate


def rendering_note(pairs, template: ChatTemplate | None) -> str | None:
    """How the conversations among `pairs` are rendered, for the user to see (None: there are none)."""
    conversations = sum(pair.conversation is not None for pair in pairs)
    if not conversations:
        return None
    how = "the tokenizer's chat template" if template is not None else \
        "the HH style (\"\\n\\nHuman: ...\\n\\nAssistant: ...\"): the tokenizer has no chat template"
    return f"{conversations:,} conversations rendered with {how}"


def render_pair(pair, template: ChatTemplate | None) -> tuple:
    """((chosen text, the character where its final response starts), (the same for rejected)) of
    `pair` (minqr.data.pairs.Pair): rendered with `template` when there is one and the pair is a
    Conversation, else the pair's texts as read."""
    if template is None or pair.conversation is None:
        return tuple((getattr(pair, side), pair.response_start(side)) for side in ("chosen", "rejected"))
    with _naming(pair):
        return tuple(_render_side(template, pair.conversation, side) for side in ("chosen", "rejected"))


def reply_text(pair, reply: str, template: ChatTemplate | None) -> str:
    """The text of `reply` as the answer to `pair`'s prompt, rendered as `render_pair` renders the
    pair (the anchor reply that scoring aligns on must read like the responses it anchors)."""
    if template is None or pair.conversation is None:
        return pair.chosen[: pair.response_start("chosen")] + reply
    prompt = pair.conversation.chosen[: pair.conversation.response_turn("chosen")]
    with _naming(pair):
        return template.render([*prompt, {"role": "assistant", "content": reply}])


@contextmanager
def _naming(pair):
    """A template's refusal of `pair`'s conversation as a MinqrError that names the pair."""
    try:
        yield
    except jinja2.TemplateError as error:
        raise MinqrError(f"{pair.origin}: the chat template refuses this conversation ({error}): fix the "
                         "conversation (most templates want user and assistant turns to alternate, a system "
                         "message first), or remove the pair") from None


def _render_side(template: ChatTemplate, conversation: Conversation, side: str) -> tuple:
    """(text, response start) of one side: the response starts where the rendering of the whole
    conversation leaves the rendering of its prompt followed by the generation prompt (the
    assistant's header), as TRL takes it (some templates render the prompt differently once a
    response follows, so this is the common prefix of the two, not the prompt's length)."""
    messages = getattr(conversation, side)
    text = template.render(messages)
    prompt = messages[: conversation.response_turn(side)]
    if not prompt:  # a template may index its first message; no prompt, no prefix
        return text, 0
    prompt_text = template.render(prompt, add_generation_prompt=prompt[-1]["role"] != "assistant")
    start = next((k for k, (a, b) in enumerate(zip(text, prompt_text)) if a != b), min(len(text), len(prompt_text)))
    return text, start
