"""The bundle's chat template, rendered as Transformers does (Jinja's immutable sandbox) but with limits.

The sandbox already forbids code execution and file access; a template can still loop for hours or build a
gigabyte string in a few steps. Here every step that can grow a value is checked *before* it runs (range sizes,
`*`, `**`, `%`, `+`, `~`, method calls and filters), every value a step returns and the whole output are bounded
(MAX_CHARS), and the render stops after RENDER_SECONDS. Any breach raises TemplateLimitError (one line).
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime

# Transformers' chat templates render a few hundred characters in well under a millisecond.
MAX_SOURCE = 1 << 20      # bytes of template source
MAX_CHARS = 4 << 20       # characters (or items) of any value a template builds, and of the output
MAX_RANGE = 10_000        # length of a range()
MAX_INT_BITS = 1 << 12    # integers a template computes (no 10**10**9)
RENDER_SECONDS = 2.0


class TemplateLimitError(RuntimeError):
    """The chat template went past a rendering limit. One line."""


def _size(x, deep: bool = False) -> int:
    """Characters in a string, or items in a container (plus their strings' characters if `deep`, for calls
    such as join that copy them; binary operators copy references only)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, (list, tuple, dict)):
        return len(x) + (sum(len(v) for v in x if isinstance(v, str)) if deep else 0)
    return 0


def _check(size: int, what: str) -> None:
    if size > MAX_CHARS:
        raise TemplateLimitError(f"the chat template builds a {what} of about {size} characters "
                                 f"(limit {MAX_CHARS})")


def _check_args(args, kwargs, what: str) -> None:
    """Integer arguments (widths, counts, indents) bounded, and the result bounded by a conservative estimate:
    every argument may be copied once per character of the largest (str.replace, join, indent, wordwrap)."""
    values = list(args) + list(kwargs.values())
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_CHARS:
            raise TemplateLimitError(f"the chat template passes {v} to {what} (limit {MAX_CHARS})")
    sizes = sorted((_size(v, deep=True) for v in values), reverse=True) + [0, 0]
    _check(sizes[0] * (1 + sizes[1]) + sum(sizes[2:]), f"{what} result")


_PRINTF_NUMBER = re.compile(r"%[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_FORMAT_FIELD = re.compile(r"\{[^{}]*\}")


def _check_format(fmt: str) -> None:
    """`%` and str.format: the widths in the format string add up to at most MAX_CHARS, none comes from an
    argument (`%*d`, `{:{w}}`)."""
    widths = [m for pair in _PRINTF_NUMBER.findall(fmt) for m in pair]
    widths += [n for f in _FORMAT_FIELD.findall(fmt) for n in re.findall(r"\d+", f.split(":", 1)[-1])]
    if "*" in widths or re.search(r"\{[^{}]*\{", fmt):
        raise TemplateLimitError("the chat template formats with a width taken from an argument")
    _check(sum(int(w) for w in widths if w) + len(fmt), "formatted string")


def _bounded_range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateLimitError(f"the chat template asks for range() of {len(r)} items (limit {MAX_RANGE})")
    return r


def _bounded_binop(operator: str, left, right):
    """Checks for the operators that can multiply a value's size in one step, before they run."""
    ints = [v for v in (left, right) if isinstance(v, int)]
    if operator == "**" and len(ints) == 2 and abs(left) > 1 and right * abs(left).bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"the chat template computes an integer over {MAX_INT_BITS} bits")
    if operator == "*":
        if len(ints) == 2 and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateLimitError(f"the chat template computes an integer over {MAX_INT_BITS} bits")
        if len(ints) == 1:
            _check(max(_size(left), _size(right)) * max(ints[0], 0), "repeated string or list")
    if operator == "+":
        _check(_size(left) + _size(right), "concatenation")
    if operator == "%" and isinstance(left, str):
        _check_format(left)
        _check(len(left) + sum(map(_size, right if isinstance(right, tuple) else (right,))), "formatted string")


def _bounded_filter(name: str, func):
    def bounded(*args, **kwargs):
        if name == "format" and args and isinstance(args[0], str):
            _check_format(args[0])
        _check_args(args, kwargs, f"the {name!r} filter")
        result = func(*args, **kwargs)
        _check(_size(result), f"{name!r} filter result")
        return result
    # keep Jinja's pass_context / pass_environment / pass_eval_context marker
    if hasattr(func, "jinja_pass_arg"):
        bounded.jinja_pass_arg = func.jinja_pass_arg
    return bounded


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 16):
        raise TemplateLimitError(f"the chat template asks tojson for an indent of {indent!r} (limit 16)")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str):
    """Jinja as Transformers renders chat templates: sandboxed, trim/lstrip blocks, `{% generation %}` kept,
    with the limits above. Returns the template; render it with `render`."""
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # Transformers tracks assistant spans with this tag; for rendering it is a plain pass-through block.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class BoundedCodeGenerator(CodeGenerator):
        # `a ~ b` compiles to a plain str join; route it through the size check instead
        def visit_Concat(self, node, frame):
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            _bounded_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
            # the sandbox hands str.format over wrapped (functools.update_wrapper): look through the wrapper
            bound_to = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if getattr(__obj, "__name__", "") in ("format", "format_map") and isinstance(bound_to, str):
                _check_format(bound_to)
            _check_args((bound_to, *args), kwargs, "a call")
            result = super().call(__context, __obj, *args, **kwargs)
            _check(_size(result), "call result")
            return result

        @staticmethod
        def bounded_concat(parts):
            parts = [str(p) for p in parts]
            _check(sum(map(len, parts)), "concatenation")
            return "".join(parts)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["range"] = _bounded_range
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(template, **context) -> str:
    """The rendered text, or TemplateLimitError once the output passes MAX_CHARS or RENDER_SECONDS pass.

    The clock is checked on every line the compiled template runs (a trace function on this thread only,
    removed afterwards); a single C-level step is already bounded in size by the checks above."""
    deadline = time.monotonic() + RENDER_SECONDS
    filename = template.root_render_func.__code__.co_filename  # "<template>": only template frames are traced

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the chat template did not finish within {RENDER_SECONDS} s")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == filename else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        out, size = [], 0
        for chunk in template.generate(**context):
            size += len(chunk)
            _check(size, "rendered prompt")
            out.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(out)
