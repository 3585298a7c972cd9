"""The bundle's chat template, rendered as Transformers does (Jinja's immutable sandbox) but bounded.

The sandbox already forbids code execution and file access; a template can still loop for hours or build a
gigabyte string in a few steps, and library calls (`expandtabs`, `indent`, `sum(start=[])`, `lipsum`, ...) run
in C or in untraced Python, past any check made between template lines. Two layers:

- checks inside the sandbox: every step that can grow a value is checked *before* it runs (range sizes, `*`,
  `**`, `%`, `+`, `~`, method calls and filters), every value a step returns, all of them together and the
  output are bounded (MAX_CHARS, MAX_TOTAL), and the clock is read on every template line (RENDER_SECONDS);
- where it runs: a template made only of steps those checks bound (`vetted`: loops, tests, `~`, the common
  string filters and methods; Emu3's own) renders in this process. Any other template renders in a worker
  process (one per process, started on first use) under RLIMIT_AS and RLIMIT_CPU with a wall deadline, so a
  call that runs away in C is stopped by the kernel or killed, whatever it allocates.
Any breach raises TemplateLimitError (one line).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from datetime import datetime

# Transformers' chat templates render a few hundred characters in well under a millisecond.
MAX_SOURCE = 1 << 20      # bytes of template source
MAX_CHARS = 4 << 20       # characters (or items) of any value a template builds, and of the output
MAX_RANGE = 10_000        # length of a range()
MAX_INT_BITS = 1 << 12    # integers a template computes (no 10**10**9)
MAX_TOTAL = 8 * MAX_CHARS  # characters of all the values one render builds together (an item counts 16)
RENDER_SECONDS = 2.0
WORKER_MEMORY = 512 << 20  # address space of the render worker (Python + Jinja take about 40 MB of it)
WORKER_START_SECONDS = 60.0  # starting the worker (an interpreter and Jinja): slow only on a loaded machine


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


# what the render on this thread may still build (values kept in many variables add up)
_budget = threading.local()


def _spend(size: int) -> None:
    left = getattr(_budget, "left", None)
    if left is not None:
        _budget.left = left - size
        if _budget.left < 0:
            raise TemplateLimitError(f"the chat template builds over {MAX_TOTAL} characters in all")


def _built(value, what: str):
    """A value a step returned: bounded alone and counted against the render's total."""
    size = _size(value)
    _check(size, what)
    _spend(size if isinstance(value, str) else 16 * size)  # an item: a pointer and mostly an object of its own
    return value


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
        return _built(func(*args, **kwargs), f"{name!r} filter result")
    # keep Jinja's pass_context / pass_environment / pass_eval_context marker
    if hasattr(func, "jinja_pass_arg"):
        bounded.jinja_pass_arg = func.jinja_pass_arg
    return bounded


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 16):
        raise TemplateLimitError(f"the chat template asks tojson for an indent of {indent!r} (limit 16)")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source):
    """Jinja as Transformers renders chat templates: sandboxed, trim/lstrip blocks, `{% generation %}` kept,
    with the limits above. `source`: the text, or what `environment()` parsed it to. Returns the template; render
    it with `render`."""
    return environment().from_string(source)


def environment():
    """The bounded sandbox that compile_chat_template compiles in."""
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
            return _built(super().call_binop(context, operator, left, right), f"{operator!r} result")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
            # the sandbox hands str.format over wrapped (functools.update_wrapper): look through the wrapper
            bound_to = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if getattr(__obj, "__name__", "") in ("format", "format_map") and isinstance(bound_to, str):
                _check_format(bound_to)
            _check_args((bound_to, *args), kwargs, "a call")
            return _built(super().call(__context, __obj, *args, **kwargs), "call result")

        @staticmethod
        def bounded_concat(parts):
            parts = [str(p) for p in parts]
            _check(sum(map(len, parts)), "concatenation")
            return _built("".join(parts), "concatenation")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["range"] = _bounded_range
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.concat = _bounded_join  # compiled templates join captured output with `environment.concat`
    return env


def _bounded_join(parts):
    """Jinja's `concat` for captured output (macros, call blocks such as `{% generation %}`, `{% set %}` blocks),
    which would otherwise join any number of pieces unchecked."""
    parts = list(parts)
    _check(sum(map(len, parts)), "captured block")
    return _built("".join(parts), "captured block")


def render(template, **context) -> str:
    """The rendered text, or TemplateLimitError once the output passes MAX_CHARS or RENDER_SECONDS pass.

    The clock is checked on every line the compiled template runs (a trace function on this thread only,
    removed afterwards); a single C-level step of a vetted template is bounded in size by the checks above."""
    return _render(template, context, RENDER_SECONDS)


def _render(template, context: dict, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    filename = template.root_render_func.__code__.co_filename  # "<template>": only template frames are traced

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the chat template did not finish within {seconds} s")
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == filename else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    _budget.left = MAX_TOTAL
    try:
        out, size = [], 0
        for chunk in template.generate(**context):
            size += len(chunk)
            _check(size, "rendered prompt")
            out.append(chunk)
    finally:
        sys.settrace(previous)
        _budget.left = None
    return "".join(out)


# ---- vetting: which templates the in-process checks bound ----
# A step the checks above see before and after it runs, costing time linear in the sizes they bound. A template
# made only of these renders in this process; anything else (other filters and methods, `*`, `%`, slices,
# macros, namespaces, captured blocks, list building) goes to the worker, which bounds it whatever it does.
_VETTED_NODES = frozenset({
    "Template", "Output", "TemplateData", "Const", "Name", "Getattr", "Getitem", "Compare", "Operand", "Test",
    "And", "Or", "Not", "Neg", "Pos", "CondExpr", "If", "For", "Concat", "Assign", "Continue", "Break", "Filter",
    "Call", "Keyword", "Add", "Sub", "Tuple", "List", "Dict", "Pair", "CallBlock", "ExtensionAttribute",
})
# each returns at most a few times its inputs' size, in time linear (or n log n) in it
_VETTED_FILTERS = frozenset({
    "abs", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float", "int", "items",
    "join", "last", "length", "list", "lower", "max", "min", "reject", "rejectattr", "replace", "reverse", "round",
    "safe", "select", "selectattr", "sort", "string", "title", "tojson", "trim", "unique", "upper", "wordcount",
})
_VETTED_METHODS = frozenset({
    "capitalize", "count", "endswith", "find", "get", "isalnum", "isalpha", "isdigit", "islower", "isspace",
    "isupper", "items", "join", "keys", "lower", "lstrip", "replace", "rfind", "rsplit", "rstrip", "split",
    "splitlines", "startswith", "strip", "title", "upper", "values",
})
_VETTED_CALLS = frozenset({"raise_exception", "range"})


def unvetted(node) -> str | None:
    """Why a parsed template (`environment.parse`) must render in the worker: the first step outside the vetted
    set, or None."""
    import jinja2.nodes as n

    kind = type(node).__name__
    if kind not in _VETTED_NODES:
        return f"a {kind} node"
    if isinstance(node, (n.Tuple, n.List, n.Dict)) and getattr(node, "ctx", "load") == "load":
        # literals of constants only: a template that builds containers of its own values goes to the worker
        leaves = [x for item in node.items for x in ((item.key, item.value) if isinstance(item, n.Pair) else (item,))]
        if not all(isinstance(x, n.Const) for x in leaves):
            return "a container of computed values"
    if isinstance(node, (n.Add, n.Sub)) and not (isinstance(node.left, n.Const) or isinstance(node.right, n.Const)):
        return f"{kind} of two computed values"
    if isinstance(node, (n.Filter, n.Test, n.Call)) and (node.dyn_args is not None or node.dyn_kwargs is not None):
        return "a call with *args or **kwargs"
    if isinstance(node, n.Filter) and node.name not in _VETTED_FILTERS:
        return f"the {node.name!r} filter"
    if isinstance(node, n.Call):
        f = node.node
        if isinstance(f, n.Getattr):
            if f.attr not in _VETTED_METHODS:
                return f"the {f.attr!r} method"
        elif not (isinstance(f, n.Name) and f.name in _VETTED_CALLS
                  or isinstance(f, n.ExtensionAttribute) and f.name == "_render"):
            return "a call of " + (f"{f.name!r}" if isinstance(f, n.Name) else "a computed value")
    if isinstance(node, n.CallBlock) and not (isinstance(node.call.node, n.ExtensionAttribute) and not node.args):
        return "a call block"
    if isinstance(node, n.For) and node.recursive:
        return "a recursive loop"
    for child in node.iter_child_nodes():
        reason = unvetted(child)
        if reason is not None:
            return reason
    return None


# ---- the render worker: a child process under RLIMIT_AS and RLIMIT_CPU, killed past a wall deadline ----

class ChatTemplate:
    """A bundle's chat template: compiled here (so a syntax error is raised at once), rendered by `render`."""

    def __init__(self, source: str):
        self.source = source
        self.sha256 = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
        env = environment()
        parsed = env.parse(source)
        self.worker_reason = unvetted(parsed)  # None: rendered in this process
        self.template = env.from_string(parsed)

    def render(self, **context) -> str:
        if self.worker_reason is None:
            return render(self.template, **context)
        return _WORKER.render(self, context)


# run in the worker: `python -I -S -c _BOOT chat_template.py sys.path` (this file alone, not the emu3_rt package)
_BOOT = ("import importlib.util, json, sys; sys.path[:0] = json.loads(sys.argv[2]); "
         "spec = importlib.util.spec_from_file_location('emu3_rt_render_worker', sys.argv[1]); "
         "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m._serve()")
_MAX_REPLY = 8 * MAX_CHARS + (1 << 16)  # the output JSON-escaped (at most 6 bytes a character) and an error


class _Worker:
    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._known: set[str] = set()  # template hashes the live worker has compiled

    def render(self, template: ChatTemplate, context: dict) -> str:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            request = {"sha256": template.sha256, "context": context, "seconds": RENDER_SECONDS}
            if template.sha256 not in self._known:
                request["source"] = template.source
            try:
                # the worker's own clock says RENDER_SECONDS; compiling gets as long again; one second of slack
                reply = self._exchange(request, RENDER_SECONDS * (1 if "source" not in request else 2) + 1.0)
            except TemplateLimitError:
                self._stop()
                raise
            self._known.add(template.sha256)
        if "text" in reply:
            return reply["text"]
        if reply.get("limit"):
            raise TemplateLimitError(reply["error"])
        import jinja2

        raise jinja2.TemplateError(reply["error"])

    def _start(self) -> None:
        import subprocess  # here: the CLI's start-up does not pay for it when the template renders in-process

        self._stop()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT, __file__, json.dumps(sys.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        self._known = set()
        if self._read(time.monotonic() + WORKER_START_SECONDS) != {"ready": True}:
            self._stop()
            raise TemplateLimitError("the chat template worker did not start")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
        self._proc = None

    def _exchange(self, request: dict, seconds: float) -> dict:
        data = json.dumps(request).encode("utf-8", "surrogatepass")
        try:
            self._proc.stdin.write(b"%d\n" % len(data) + data)
            self._proc.stdin.flush()
        except OSError:
            raise TemplateLimitError("the chat template worker stopped") from None
        reply = self._read(time.monotonic() + seconds)
        if reply is None:
            # killed by RLIMIT_CPU (SIGXCPU), out of address space past what Python could report, or past the
            # wall deadline (waiting, sleeping): all of them are a template that did not finish
            raise TemplateLimitError(f"the chat template did not finish within {RENDER_SECONDS} s "
                                     f"and {WORKER_MEMORY >> 20} MiB")
        return reply

    def _read(self, deadline: float):
        """One length-prefixed JSON reply, or None when the worker dies, says too much or misses the deadline."""
        import select

        fd, buf, want = self._proc.stdout.fileno(), b"", None
        while want is None or len(buf) < want:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            buf += chunk
            if want is None and b"\n" in buf:
                head, buf = buf.split(b"\n", 1)
                want = int(head) if head.isdigit() and int(head) <= _MAX_REPLY else None
                if want is None:
                    return None
            elif want is None and len(buf) > 32:
                return None
        return json.loads(buf[:want])


_WORKER = _Worker()


def _serve() -> None:
    """The worker's loop: one length-prefixed JSON request on stdin, one reply on stdout, until stdin closes."""
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a render stops
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    import jinja2

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    templates: dict = {}

    def reply(value: dict) -> None:
        data = json.dumps(value).encode("utf-8", "surrogatepass")
        stdout.write(b"%d\n" % len(data) + data)
        stdout.flush()

    reply({"ready": True})
    while True:
        head = stdin.readline()
        if not head.strip():
            return
        request = json.loads(stdin.read(int(head)))
        # CPU seconds from now on for this request (compiling included): past them SIGXCPU ends the process
        used = resource.getrusage(resource.RUSAGE_SELF)
        seconds = float(request["seconds"])
        cpu = int(used.ru_utime + used.ru_stime + 2 * seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, resource.RLIM_INFINITY))
        try:
            if "source" in request:
                templates[request["sha256"]] = compile_chat_template(request["source"])
            text = _render(templates[request["sha256"]], request["context"], seconds)
            reply({"text": text})
        except TemplateLimitError as e:
            reply({"error": str(e), "limit": True})
        except MemoryError:
            reply({"error": f"the chat template needs over {WORKER_MEMORY >> 20} MiB", "limit": True})
        except (jinja2.TemplateError, RecursionError, ArithmeticError, TypeError, ValueError, LookupError,
                AttributeError) as e:
            reply({"error": (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__})
