"""A model's chat template: the `chat_template` of its tokenizer_config.json, the Jinja source that
turns a conversation (a list of {"role", "content"} messages) into the text the model reads. The
tokenizer carries it (minqr/models/tokenizer.py); minqr/data/chat.py renders preference pairs with it.

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
"""
import json
from datetime import datetime

import jinja2

from minqr.errors import MinqrError
from minqr.models.template_limits import BoundedEnvironment


def _raise_exception(message):
    # what a template calls to refuse its input (e.g. roles that do not alternate)
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which a prompt must keep as they are
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A chat template (Jinja source) and the special tokens it may write, {name: token string}."""

    def __init__(self, source: str, special_tokens: dict, where: str):
        self.environment = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.environment.filters["tojson"] = _tojson
        self.environment.globals["raise_exception"] = _raise_exception
        self.environment.globals["strftime_now"] = self._strftime_now
        try:
            self.template = self.environment.template(source)
        except jinja2.TemplateSyntaxError as error:
            raise MinqrError(f"{where}: the chat template is no valid Jinja ({error.message}, line {error.lineno} "
                             "of the template): fix it, or remove it to use the texts as they are") from None
        except RecursionError:  # thousands of nested blocks or brackets: more than the compiler's stack
            raise MinqrError(f"{where}: the chat template nests too deep to compile: fix it, or remove it to use "
                             "the texts as they are") from None
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.where = where
        # what strftime_now reads: the current time (None), or a moment pinned by the caller, so
        # that a training run renders its texts on every day of its life as on its first
        self.clock: datetime | None = None

    def _strftime_now(self, format):
        return (self.clock or datetime.now()).strftime(format)

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        """The conversation `messages` as text; with `add_generation_prompt`, followed by what opens
        the assistant's next turn. Whatever the template raises (its own refusal, a jinja2.TemplateError;
        an error of its code; RenderLimitExceeded past the bounds of minqr/models/template_limits.py)
        goes through (minqr/data/chat.py's refusals_named says which pair)."""
        budget = self.environment.budget
        budget.start()
        parts = []
        for part in self.template.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                           tools=None, documents=None, **self.special_tokens):
            budget.count(part)
            parts.append(part)
        return "".join(parts)
