"""Chat templates: a conversation (a list of {"role", "content"} messages) as the text a chat model
reads, rendered with the model's own Jinja template, the `chat_template` of its tokenizer_config.json.

`ChatTemplate.render` gives the string that transformers' `tokenizer.apply_chat_template(messages,
tokenize=False)` gives: the template runs in a sandboxed Jinja environment set up as transformers
sets it up (blocks trimmed, loop controls, a `tojson` filter that keeps non-ASCII text, and the
globals `raise_exception` and `strftime_now`; `dict` and `namespace` are Jinja's own, which
transformers 5 wraps in narrower versions for extra safety), with the variables transformers passes:
`messages`, `add_generation_prompt`, `tools` and `documents` (None: minqr passes none), and the
tokenizer's special tokens by name (`bos_token`, `eos_token`, ...). Tokens such as Llama 3's
`<|begin_of_text|>` are in the text only when the template writes them; minqr's tokenizer adds
nothing (minqr/models/tokenizer.py), which is what transformers does when it tokenises a rendered
conversation.

`render_pair` gives the two texts of a preference pair and where their final responses start:
with the template for a pair given as message lists throughout (`Pair.conversation`), as they are
otherwise (strings, and the HH-style text of pairs that mix strings and messages).
"""
import json
from contextlib import contextmanager
from datetime import datetime

import jinja2

from minqr.data.pairs import Conversation
from minqr.data.template_limits import BoundedEnvironment
from minqr.errors import MinqrError


def _raise_exception(message):
    # what a template calls to refuse its input (e.g. roles that do not alternate)
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which a prompt must keep as they are
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class ChatTemplate:
    """A chat template (Jinja source) and the special tokens it may write, {name: token string}."""

    def __init__(self, source: str, special_tokens: dict, where: str):
        self.environment = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.environment.filters["tojson"] = _tojson
        self.environment.globals["raise_exception"] = _raise_exception
        self.environment.globals["strftime_now"] = _strftime_now
        try:
            self.template = self.environment.template(source)
        except jinja2.TemplateSyntaxError as error:
            raise MinqrError(f"{where}: the chat template is no valid Jinja ({error.message}, line {error.lineno} "
                             "of the template): fix it, or remove it to use the texts as they are") from None
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.where = where

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        """The conversation `messages` as text; with `add_generation_prompt`, followed by what opens
        the assistant's next turn. Whatever the template raises (its own refusal, a jinja2.TemplateError;
        an error of its code; RenderLimitExceeded past the bounds of minqr/data/template_limits.py)
        goes through (render_pair says which pair)."""
        budget = self.environment.budget
        budget.start()
        parts = []
        for part in self.template.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                           tools=None, documents=None, **self.special_tokens):
            budget.count(part)
            parts.append(part)
        return "".join(parts)


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


@contextmanager
def refusals_named(origin: str, template: ChatTemplate):
    """Whatever `template` raises while it renders the conversation of `origin` (a pair's "FILE:LINE"),
    as one MinqrError that names both: a refusal by raise_exception (a jinja2.TemplateError), an error
    in the template's code (OverflowError, ZeroDivisionError, RecursionError, MemoryError, ...) or a
    bound of minqr/data/template_limits.py."""
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
