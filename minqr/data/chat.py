"""Chat templates: a conversation (a list of {"role", "content"} messages) as the text a chat model
reads, rendered with the model's own Jinja template (minqr/models/chat_template.py, which the
tokenizer carries).

`render_pair` gives the two texts of a preference pair and where their final responses start:
with the template for a pair given as message lists throughout (`Pair.conversation`), as they are
otherwise (strings, and the HH-style text of pairs that mix strings and messages).
`prompt_reply_texts` is the same rule for one prompt and its replies, what the reward functions and
best-of-N read, so that a model reads at use what it was trained on.
"""
from contextlib import contextmanager

import jinja2

from minqr.data.pairs import Conversation, render
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
    with refusals_named(pair.origin, template):
        chosen, rejected = (_render_side(template, pair.conversation, side) for side in ("chosen", "rejected"))
    if chosen[0] == rejected[0]:  # the conversations differ (readers drop identical ones): the template lost it
        raise MinqrError(f"{pair.origin}: the chat template of {template.where} renders the chosen and the rejected "
                         "conversation as the same text, so the pair would teach nothing (does the template leave "
                         "out the final response, or cut it short?): fix the template, or remove it to use the "
                         "texts as they are")
    return chosen, rejected


def reply_text(pair, reply: str, template: ChatTemplate | None) -> str:
    """The text of `reply` as the answer to `pair`'s prompt, rendered as `render_pair` renders the
    pair (the anchor reply that scoring aligns on must read like the responses it anchors)."""
    if template is None or pair.conversation is None:
        return pair.chosen[: pair.response_start("chosen")] + reply
    prompt = pair.conversation.chosen[: pair.conversation.response_turn("chosen")]
    with refusals_named(pair.origin, template):
        return template.render([*prompt, {"role": "assistant", "content": reply}])


def prompt_reply_texts(prompt, replies, template: ChatTemplate | None, origin: str) -> tuple[list, bool]:
    """(texts, hh): the text of each of `replies` answering `prompt`, each a string or a list of
    {"role", "content"} messages, all in one rendering, as training reads a pair: with `template`
    only when the prompt and every reply are message lists; else the HH-style text of each part
    (strings as they are). `hh`: whether messages were read in the HH style, for the caller to say.
    One rendering, so that a reply and the reference it is read against are never rendered apart.
    `origin` names the input in a template's refusal."""
    values = (prompt, *replies)
    if template is not None and all(isinstance(value, list) for value in values):
        with refusals_named(origin, template):
            return [template.render([*prompt, *reply]) for reply in replies], False
    return [render(prompt) + render(reply) for reply in replies], any(isinstance(value, list) for value in values)


@contextmanager
def refusals_named(origin: str, template: ChatTemplate):
    """Whatever `template` raises while it renders the conversation of `origin` (a pair's "FILE:LINE"),
    as one MinqrError that names both: a refusal by raise_exception (a jinja2.TemplateError), an error
    in the template's code (OverflowError, ZeroDivisionError, RecursionError, MemoryError, ...) or a
    bound of minqr/models/template_limits.py."""
    try:
        yield
    except Exception as error:  # the template is code from a model folder: any exception is its refusal
        what = str(error) if isinstance(error, jinja2.TemplateError) else f"{type(error).__name__}: {error}"
        raise MinqrError(f"{origin}: the chat template of {template.where} refuses this conversation ({what}). "
                         "The template decides this: if it names a rule that the conversation breaks (most "
                         "templates want user and assistant turns to alternate, a system message first), fix or "
                         "remove the pair; else fix the template, or remove it to use the texts as they are") from None


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
