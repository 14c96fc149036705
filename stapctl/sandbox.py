"""jinja2's sandbox, bounded, for the probe templates that use template syntax.

Imported only when a template has some (stapctl.render): a plain script needs no
jinja2, whose import is a good part of a run's start-up.
"""

from __future__ import annotations

import functools
import inspect
import re
import string
import traceback
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from stapctl.errors import Issue, ManifestError
from stapctl.models import Probe
from stapctl.render import MAX_SCRIPT_BYTES

_MAX_INT_BITS = 1 << 16  # no number in a probe script needs more (about 19,700 digits)
_TOO_LARGE = "would build more than 1 MiB of text"
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|[0-9]+)?(?:\.(\*|[0-9]*))?[hlL]?.?")
_SIZED_STR_METHODS = {"ljust", "rjust", "center", "zfill", "expandtabs", "replace", "join",
                      "translate"}

# Characters a render may still write (per render; templates also run in threads).
_WRITE_BUDGET: ContextVar[int] = ContextVar("write_budget", default=MAX_SCRIPT_BYTES)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """jinja2's sandbox (immutable: no ``list.append`` to grow a value in a loop), with a
    cap on every operation that can build a large value, so that a manifest cannot
    exhaust the controller's memory: ``'%999999999s' % 1``, ``'a' * 10**9``,
    ``'a'|center(10**9)``, ``'a'.ljust(10**9)``, ``'{:>999999999}'.format(1)``, a loop
    writing ``x`` a billion times. Sizes are estimated before anything is built, and
    what the template writes, inside macros and blocks too, is counted as it is written.
    Nothing is evaluated at compile time, so the caps apply to constants too."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                         autoescape=False, optimized=False)
        self.code_generator_class = _CountingCodeGenerator
        self.globals.pop("lipsum")  # lipsum(10**6) writes megabytes without an operator
        for name in {*_FILTER_ESTIMATES, *_MATERIALIZING_FILTERS}:
            self.filters[name] = _bounded_filter(self.filters[name],
                                                 _FILTER_ESTIMATES.get(name),
                                                 reads_all=name in _MATERIALIZING_FILTERS)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if isinstance(left, int) and isinstance(right, int):
            _check_number(operator, left, right)
        elif operator == "*":
            for value, times in ((left, right), (right, left)):
                if isinstance(times, int) and not isinstance(value, int):
                    _refuse_past_cap(_written_size(value) * times)
        elif operator == "+":
            _refuse_past_cap(_written_size(left) + _written_size(right))
        elif operator == "%" and isinstance(left, str | bytes):
            text = left if isinstance(left, str) else left.decode("latin-1")  # same length
            _refuse_past_cap(_format_size(text, _percent_fields(text), right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str | bytes) and name in _SIZED_STR_METHODS:
            if name == "join":  # read the items once, counting them as they come
                items = _counted_items(args[0] if args else kwargs.get("iterable", ()))
                _refuse_past_cap(_joined_size(owner, items))
                args, kwargs = (items,), {}
            else:
                _refuse_past_cap(_str_method_size(owner, name, args, kwargs))
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        formats = super().wrap_str_format(value)
        if formats is None:
            return None
        text: str = value.__self__

        def bounded(*args: Any, **kwargs: Any) -> str:
            arguments = [*args, *kwargs.values()]
            _refuse_past_cap(_format_size(text, _brace_fields(text), arguments))
            assert formats is not None
            return formats(*args, **kwargs)

        return bounded

    def concatenate(self, values: tuple[Any, ...]) -> str:
        """The `~` operator, sized before it is built."""
        _refuse_past_cap(sum(_written_size(value) for value in values))
        return "".join(str(value) for value in values)

    def written(self, value: Any) -> str:
        """Every piece of text a template writes passes here, and counts (text a macro
        or a block writes counts again where it is used)."""
        left = _WRITE_BUDGET.get()
        text = str(value) if _written_size(value, left) <= left else None
        if text is None or len(text) > left:
            raise SecurityError("the template writes more than 1 MiB, the most a probe "
                                "script may be")
        _WRITE_BUDGET.set(left - len(text))
        return text


class _CountingCodeGenerator(CodeGenerator):
    """Writes template output through ``environment.written`` and `~` through
    ``environment.concatenate``, and folds no constant output at compile time."""

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame,
                               finalize: CodeGenerator._FinalizeInfo) -> str:
        if not isinstance(node, nodes.TemplateData):
            raise nodes.Impossible()  # evaluated at run time, under the caps
        return super()._output_child_to_const(node, frame, finalize)

    def _output_const_repr(self, group: Iterable[Any]) -> str:
        return f"environment.written({super()._output_const_repr(group)})"

    def _output_child_pre(self, node: nodes.Expr, frame: Frame,
                          finalize: CodeGenerator._FinalizeInfo) -> None:
        self.write("environment.written(")

    def _output_child_post(self, node: nodes.Expr, frame: Frame,
                           finalize: CodeGenerator._FinalizeInfo) -> None:
        self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concatenate((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


def _refuse_past_cap(size: int) -> None:
    if size > MAX_SCRIPT_BYTES:
        raise SecurityError(_TOO_LARGE)


def _check_number(operator: str, left: int, right: int) -> None:
    bits = {"*": left.bit_length() + right.bit_length(),
            "**": left.bit_length() * right if abs(left) > 1 else 0}.get(operator, 0)
    if bits > _MAX_INT_BITS:
        raise SecurityError("the number would be too large for a template")


_END = object()


def _written_size(value: Any, limit: int = MAX_SCRIPT_BYTES) -> int:
    """About how many characters ``value`` makes when written out: text by its length,
    containers by all their items (a repeated item each time it appears), counted
    without writing anything and only until past ``limit``."""
    total = 0
    stack: list[Iterator[Any]] = [iter((value,))]
    while stack and total <= limit:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, Namespace):
            total += 1
            stack.append(iter(object.__getattribute__(item, "_Namespace__attrs").items()))
        elif isinstance(item, Mapping):
            total += 1
            stack.append(iter(item.items()))
        elif isinstance(item, Collection) and not isinstance(item, range):
            total += 1
            stack.append(iter(item))
        else:
            total += 24  # a float, None, a range, an iterator...
    return total


def _counted_items(values: Any) -> Collection[Any]:
    """The items of an iterable, as they are if they exist already, else read once and
    refused as soon as they grow past the cap (a generator of large strings must not be
    kept whole)."""
    if isinstance(values, Collection):
        return values
    items: list[Any] = []
    total = 0
    for item in values:
        total += _written_size(item) + 1
        _refuse_past_cap(total)
        items.append(item)
    return items


def _joined_size(separator: Any, items: Collection[Any]) -> int:
    return (sum(_written_size(item) for item in items)
            + _written_size(separator) * max(len(items) - 1, 0))


def _text(value: Any) -> str:
    """``value`` as text, refused first if writing it would pass the cap."""
    if isinstance(value, str):
        return value
    _refuse_past_cap(_written_size(value))
    return str(value)


def _str_method_size(text: str | bytes, name: str, args: tuple[Any, ...],
                     kwargs: Mapping[str, Any]) -> int:
    """The most a str (or bytes) method call can build."""
    def argument(index: int, keyword: str, default: Any) -> Any:
        return args[index] if len(args) > index else kwargs.get(keyword, default)

    if name == "expandtabs":
        tabsize = argument(0, "tabsize", 8)
        tabs = text.count("\t") if isinstance(text, str) else text.count(b"\t")
        return len(text) + tabs * tabsize if isinstance(tabsize, int) else 0
    if name == "replace":
        return _replaced_size(text, argument(0, "old", ""), argument(1, "new", ""),
                              argument(2, "count", -1))
    if name == "translate":
        table = argument(0, "table", {})
        replacements = table.values() if isinstance(table, Mapping) else (
            table if isinstance(table, Collection) else ())
        longest = max((_written_size(item) for item in replacements), default=1)
        return len(text) * max(longest, 1)
    width = argument(0, "width", 0)
    return max(len(text), width if isinstance(width, int) else 0)


def _replaced_size(text: str | bytes, old: Any, new: Any, count: Any) -> int:
    if not isinstance(old, str | bytes) or not isinstance(new, str | bytes):
        return len(text)  # str.replace refuses them itself
    found = text.count(old) if old else len(text) + 1  # type: ignore[arg-type]
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * max(len(new) - len(old), 0)


def _percent_fields(text: str) -> list[str]:
    """The width and precision of each ``%`` conversion in ``text``."""
    fields = []
    for match in _PERCENT_SPEC.finditer(text):
        if "*" in (match[1], match[2]):
            raise SecurityError("a '*' width or precision in a % format is not allowed: "
                                "write the number")
        fields.append(f"{match[1] or ''}.{match[2] or ''}")
    return fields


def _brace_fields(text: str) -> list[str]:
    """The format spec of each ``{}`` field in ``text``."""
    fields = []
    for _, name, spec, _ in string.Formatter().parse(text):
        if name is None:
            continue
        if spec and "{" in spec:
            raise SecurityError("a nested {} in a format spec is not allowed: write the "
                                "number")
        fields.append(spec or "")
    return fields


def _format_size(text: str, fields: list[str], arguments: Any) -> int:
    """The most a format with these fields can build: each field as wide as its widths
    say, or as the largest argument (a field may use any of them)."""
    if isinstance(arguments, Mapping):
        values: Any = arguments.values()
    elif isinstance(arguments, tuple | list):
        values = arguments
    else:
        values = (arguments,)
    largest = max((_written_size(value) for value in values), default=0)
    widths = sum(int(number) for spec in fields for number in re.findall(r"[0-9]+", spec))
    return len(text) + widths + len(fields) * largest


# Filters that can build more than they are given, and the most each can build, from
# its arguments (bound by name, defaults applied).
def _center_size(arguments: Mapping[str, Any]) -> int:
    width = arguments["width"]
    return max(len(_text(arguments["value"])), width if isinstance(width, int) else 0)


def _format_filter_size(arguments: Mapping[str, Any]) -> int:
    text = _text(arguments["value"])
    return _format_size(text, _percent_fields(text), arguments["args"] or arguments["kwargs"])


def _indent_size(arguments: Mapping[str, Any]) -> int:
    text, width = _text(arguments["s"]), arguments["width"]
    prefix = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    return len(text) + (text.count("\n") + 1) * prefix


def _wordwrap_size(arguments: Mapping[str, Any]) -> int:
    text = _text(arguments["s"])
    wrapstring = arguments["wrapstring"] or "\n"
    return len(text) + (len(text) + 1) * len(_text(wrapstring))


def _join_size(arguments: Mapping[str, Any]) -> int:
    return _joined_size(arguments["d"], arguments["value"])


def _replace_size(arguments: Mapping[str, Any]) -> int:
    return _replaced_size(_text(arguments["s"]), arguments["old"], arguments["new"],
                          arguments["count"])


def _batch_size(arguments: Mapping[str, Any]) -> int:
    linecount = arguments["linecount"]
    return linecount if arguments["fill_with"] is not None and isinstance(linecount, int) \
        else 0


_FILTER_ESTIMATES: dict[str, Callable[[Mapping[str, Any]], int]] = {
    "center": _center_size, "format": _format_filter_size, "indent": _indent_size,
    "wordwrap": _wordwrap_size, "join": _join_size, "replace": _replace_size,
    "batch": _batch_size,
}
# Filters that read all of their input at once: it is counted while it is read.
_MATERIALIZING_FILTERS = ("join", "list", "sum", "sort", "unique", "reverse", "groupby",
                          "slice", "random")


def _bounded_filter(original: Callable[..., Any],
                    estimate: Callable[[Mapping[str, Any]], int] | None,
                    reads_all: bool) -> Callable[..., Any]:
    """The filter, refused when its ``estimate`` is past the cap; one that ``reads_all``
    its input gets it counted while read."""
    sync = getattr(original, "__wrapped__", original)  # jinja2's async variants wrap it
    signature = inspect.signature(sync)
    input_name = list(signature.parameters)[1 if hasattr(sync, "jinja_pass_arg") else 0]

    @functools.wraps(sync)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        if reads_all:
            call.arguments[input_name] = _counted_items(call.arguments[input_name])
        if estimate is not None:
            _refuse_past_cap(estimate(call.arguments))
        return sync(*call.args, **call.kwargs)

    return bounded


_ENVIRONMENT = _BoundedEnvironment()
_TEMPLATE_FILENAME = "<template>"  # what jinja2 names a template compiled from a string
_UNDEFINED_NAME = re.compile(r"^'([A-Za-z_][A-Za-z0-9_]*)' is undefined$")

# What a template can raise while it runs: jinja2's own errors and the Python errors of
# the expressions it evaluates (1/0, a missing key, a bad filter argument).
_TEMPLATE_RUNTIME_ERRORS = (
    jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError,
    RecursionError,
)

def check(probe: Probe) -> None:
    """Raise ManifestError if the probe's template does not parse (no variables needed)."""
    _compile(probe)


def render(probe: Probe, variables: Mapping[str, Any]) -> str:
    """The probe's script with ``variables`` filled in; ManifestError on any template error."""
    template = _compile(probe)
    budget = _WRITE_BUDGET.set(MAX_SCRIPT_BYTES)
    try:
        return "".join(template.generate(variables))  # counted as it is written
    except _TEMPLATE_RUNTIME_ERRORS as error:
        raise ManifestError(_issue(probe, _failing_line(error), _explain(error))) from error
    finally:
        _WRITE_BUDGET.reset(budget)

@functools.lru_cache(maxsize=256)
def _template(source: str) -> jinja2.Template:
    """Compiled once per template text: planning renders each probe for every host."""
    return _ENVIRONMENT.from_string(source)


def _compile(probe: Probe) -> jinja2.Template:
    try:
        return _template(probe.template)
    except jinja2.TemplateSyntaxError as error:
        message = f"template syntax error: {error.message}"
        raise ManifestError(_issue(probe, error.lineno, message)) from error


def _failing_line(error: BaseException) -> int | None:
    """The template line that raised: jinja2 rewrites the traceback so the template's
    frames carry template line numbers."""
    line = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = lineno
    return line


def _explain(error: BaseException) -> str:
    if isinstance(error, jinja2.UndefinedError):
        match = _UNDEFINED_NAME.match(str(error.message))
        if match:
            name = match.group(1)
            return (f"undefined variable '{name}': define it under vars, in the inventory, "
                    f"or with -e {name}=VALUE")
        return f"undefined value: {error.message}"
    if isinstance(error, jinja2.exceptions.SecurityError):
        return f"not allowed in a template: {error}"
    if isinstance(error, jinja2.TemplateError):
        return f"template error: {error.message}"
    return f"template error: {type(error).__name__}: {error}"


def _issue(probe: Probe, template_line: int | None, message: str) -> Issue:
    line = None if template_line is None else probe.first_line + template_line - 1
    return Issue(probe.origin, line, None, f"probe {probe.name}", message)
