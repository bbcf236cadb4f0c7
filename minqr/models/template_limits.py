"""A Jinja sandbox that bounds how long a template renders and how much it writes.

A chat template comes with a model folder, and Jinja's sandbox keeps it from reaching Python's
internals, but not from running for ever or filling memory: `range` is capped at 100,000 items,
yet two nested loops over it are 10^10 iterations, and `"x" * 10**10` is a 10 GB string. minqr
renders thousands of conversations, so one such template would hang training without a word.

`BoundedEnvironment` gives every rendering a budget (`start`): a deadline and a number of
characters. The deadline is checked at every iteration of every `{% for %}` loop (each loop's
iterable is wrapped when the template is compiled) and every call, filter and operator the
template uses (macros included); the characters bound what the template writes
(`RenderBudget.count`), every `+`, `*`, `**` and `~` it computes and every width that `%`, `|format`,
`str.format` and the padding methods (`"x".center(10**9)`) would pad to, before they are
computed, the sizes that `replace`, `expandtabs`, `join`, `indent` and `batch` would make, before
they make them (a call runs out of reach of the clock), and whatever a call or a filter returns
(`|tojson`), once it is. Past either bound, `RenderLimitExceeded`. Jinja's `lipsum` is taken out:
it makes text for hours inside one call, and no chat template writes placeholder text.
"""
import re
import functools
import math
import time

from jinja2 import nodes
from jinja2.nodes import EvalContext
from jinja2.ext import Extension, loopcontrols
from jinja2.visitor import NodeTransformer
from jinja2.sandbox import ImmutableSandboxedEnvironment

# per rendering of one conversation: real templates take milliseconds and write a few times the
# conversation's text; these bounds are for templates gone wrong
RENDER_SECONDS = 10.0
MAX_RENDERED_CHARS = 16_000_000
# integers: multiplying ones of millions of digits takes seconds each, and no template needs them
# (Python itself prints at most 4,300 digits)
MAX_INTEGER_DIGITS = 10_000


class RenderLimitExceeded(RuntimeError):
    pass


class RenderBudget(Extension):
    """The budget of the rendering under way; an extension so that compiled templates can reach
    `guard` by a name no template can shadow."""

    def __init__(self, environment):
        super().__init__(environment)
        self.seconds, self.chars = RENDER_SECONDS, MAX_RENDERED_CHARS
        self.deadline, self.written = math.inf, 0

    def start(self) -> None:
        self.deadline, self.written = time.monotonic() + self.seconds, 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimitExceeded(f"rendering took more than {self.seconds:g} s (a loop that does not end?)")

    def check_size(self, size: int, unit: str = "items") -> None:
        limit = MAX_INTEGER_DIGITS if unit == "digits" else self.chars
        if size > limit:
            raise RenderLimitExceeded(f"it makes a value of {size:,} {unit}, more than {limit:,}")

    def count(self, text: str) -> None:
        """`text` was written: the output so far must stay within the bound, and the time too."""
        self.written += len(text)
        if self.written > self.chars:
            raise RenderLimitExceeded(f"it writes more than {self.chars:,} characters")
        self.check_time()

    def concat(self, *parts):
        """What `a ~ b ~ ...` compiles to instead of Jinja's own join: the same text, its size bounded
        before it is made."""
        texts = [str(part) for part in parts]
        self.check_size(sum(map(len, texts)), "characters")
        return "".join(texts)

    def guard(self, iterable):
        """What a `{% for %}` loop iterates over instead of `iterable`: the same items, each after a
        look at the clock."""
        for item in iterable:
            self.check_time()
            yield item


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox for chat templates (minqr/data/chat.py sets it up as transformers
    does), with a RenderBudget of RENDER_SECONDS and MAX_RENDERED_CHARS (as they are when it is
    made): `template(source)` compiles `source` with every loop guarded, `budget.start()` opens a rendering."""

    intercepted_binops = frozenset(["+", "*", "**", "%"])

    def __init__(self, **options):
        super().__init__(extensions=[loopcontrols, RenderBudget], **options)
        self.budget = self.extensions[RenderBudget.identifier]
        self.filters = _Bounded(self.filters, self.budget)  # filters added later are bounded too
        # Jinja's placeholder-text generator: lipsum(10**8) runs for hours inside one call, out of
        # reach of the clock; no chat template writes lorem ipsum (one that calls it is refused)
        self.globals.pop("lipsum", None)

    def template(self, source: str):
        """The compiled template of `source` (a jinja2.TemplateSyntaxError if it is no valid Jinja)."""
        tree = _GuardedTree(self.budget).visit(self.parse(source))
        return self.from_string(tree)

    def call(self, context, function, *args, **kwargs):
        self.budget.check_time()
        if isinstance(getattr(function, "__self__", None), str):  # a str method: its size, before it is made
            planned = _planned_size(function.__name__, function.__self__, args, kwargs)
            if planned is not None:
                self.budget.check_size(planned, "characters")
        return _sized(super().call(context, function, *args, **kwargs), self.budget)

    def getattr(self, obj, attribute):
        # the sandbox hands out str.format wrapped, its string out of reach of `call`: checked here
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_widths(obj, self.budget)
        return super().getattr(obj, attribute)

    def call_binop(self, context, operator: str, left, right):
        self.budget.check_time()
        sized = (str, list, tuple)
        if operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            self.budget.check_size(len(left) + len(right))
        elif operator == "*" and isinstance(left, sized) and isinstance(right, int):
            self.budget.check_size(len(left) * right)
        elif operator == "*" and isinstance(right, sized) and isinstance(left, int):
            self.budget.check_size(len(right) * left)
        elif operator == "%" and isinstance(left, str):
            _check_widths(left, self.budget)
        elif operator == "*" and isinstance(left, int) and isinstance(right, int):
            # a product has about as many digits as its factors together (x * x * x ... grows fast)
            self.budget.check_size(math.ceil((left.bit_length() + right.bit_length()) * math.log10(2)), "digits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            # an integer of that many digits is the size that matters (10**10**9 never ends)
            self.budget.check_size(math.ceil(right * math.log10(abs(left))), "digits")
        return super().call_binop(context, operator, left, right)


PADDING = ("center", "ljust", "rjust", "zfill")  # str methods whose first argument is the width made
# the widths and precisions of printf-style fields ("%200s", "%.9f"), and str.format's fields ("{:>200.2f}")
_PRINTF_FIELD = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d+))?")
_FORMAT_FIELD = re.compile(r"\{([^{}]*)\}")


def _check_widths(text: str, budget: RenderBudget) -> None:
    """The widest field a format string asks for is within the budget, before it is formatted."""
    numbers = [n for match in _PRINTF_FIELD.finditer(text) for n in match.groups() if n]
    for field in _FORMAT_FIELD.finditer(text):  # every number of a field's spec, after its ':'
        numbers += re.findall(r"\d+", field.group(1).partition(":")[2])
    if numbers:
        budget.check_size(max(map(int, numbers)), "characters")


def _planned_size(name: str, target, args: tuple, kwargs: dict) -> int | None:
    """The size that the str method or the filter `name` would make of `target` with `args`, where
    it can be told before it is made (the allocation comes first, and a call out of reach of the
    clock); None where it cannot, or the result is no larger than what it is made of."""
    def argument(index: int, keyword: str, default=None):
        return args[index] if len(args) > index else kwargs.get(keyword, default)

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if name in PADDING:  # (center is a filter too)
        width = argument(0, "width", 80)
        return width if whole(width) else None
    if isinstance(target, str) and name == "replace":
        old, new, count = argument(0, "old"), argument(1, "new"), argument(2, "count", -1)
        if isinstance(old, str) and isinstance(new, str) and whole(count):
            found = target.count(old) if old else len(target) + 1
            return len(target) + (found if count < 0 else min(found, count)) * max(0, len(new) - len(old))
    if isinstance(target, str) and name == "expandtabs":
        size = argument(0, "tabsize", 8)
        return len(target) + target.count("\t") * size if whole(size) else None
    if isinstance(target, str) and name == "indent":
        width = argument(0, "width", 4)
        width = len(width) if isinstance(width, str) else width
        return len(target) + (target.count("\n") + 1) * width if whole(width) else None
    if name == "join":  # sep.join(items), or items|join(sep)
        separator, items = (target, argument(0, "iterable")) if isinstance(target, str) else \
            (argument(0, "d", ""), target)
        if isinstance(separator, str) and isinstance(items, (list, tuple)) and all(isinstance(i, str) for i in items):
            return sum(map(len, items)) + len(separator) * max(0, len(items) - 1)
    if name == "batch" and argument(1, "fill_with") is not None:  # the last row is filled to linecount
        count = argument(0, "linecount")
        return count if whole(count) else None
    return None


def _sized(value, budget: RenderBudget):
    """`value`, once its size is within the budget (a str, list, tuple or dict a call or filter made)."""
    if isinstance(value, (str, list, tuple, dict)):
        budget.check_size(len(value))
    return value


class _Bounded(dict):
    """The environment's filters, each called after a look at the clock and its result's size checked."""

    def __init__(self, filters: dict, budget: RenderBudget):
        super().__init__()
        self.budget = budget
        for name, function in filters.items():
            self[name] = function

    def __setitem__(self, name, function):
        budget = self.budget

        @functools.wraps(function)
        def bounded(*args, **kwargs):
            budget.check_time()
            given = args[1:] if args and isinstance(args[0], EvalContext) else args  # some filters take it first
            if name == "format" and given and isinstance(given[0], str):  # "%200000000s"|format(...)
                _check_widths(given[0], budget)
            planned = _planned_size(name, given[0], given[1:], kwargs) if given else None
            if planned is not None:
                budget.check_size(planned, "characters")
            return _sized(function(*args, **kwargs), budget)
        super().__setitem__(name, bounded)


class _GuardedTree(NodeTransformer):
    """Every `{% for %}` loop iterates over `guard(its iterable)`, and every `~` is `concat(...)`."""

    def __init__(self, budget: RenderBudget):
        self.budget = budget

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = nodes.Call(self.budget.attr("guard", lineno=node.lineno), [node.iter], [], None, None,
                               lineno=node.lineno)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return nodes.Call(self.budget.attr("concat", lineno=node.lineno), node.nodes, [], None, None,
                          lineno=node.lineno)
