"""Final answers checked with math-verify at a bounded cost, in every thread.

math-verify reads LaTeX into sympy, which computes what an expression denotes: `9^{9^{9}}` has 370 million
digits, `1000000!` 5.5 million, and sympy factors a number under a square root (900 digits: 0.3 s).
math-verify's own timeout uses SIGALRM, which only the main thread may set, and a big-integer computation in C
holds the GIL, so nothing in this process could stop it. Two bounds hold in every thread instead:

1. `too_costly` estimates, without evaluating anything, the size of every value an answer denotes: digits of
   powers and towers (bracketed bases, exponents that are products or sums), factorials, binomials, fractions
   and roots of them, and the terms of a power of a sum. An answer over the limits scores 0 at once.
2. Everything else is read and compared in a child process, which gives up on an answer once it has spent
   `CPU_LIMIT_S` of CPU time on it (a profiling timer, whose signal interrupts sympy between two Python steps)
   and is killed when it has not answered within `WALL_LIMIT_S` (a single long step in C); either way the
   answer scores 0, and a killed child is replaced at once. Children are reused, one per concurrent caller,
   warmed up before their first answer, and keep the reference answers they have read, so the common case
   costs a pipe round trip more than parsing in place.

The module imports nothing of rlvr's and no math library at the top: a child runs it as `python -m
rlvr.answers` without loading torch, and the caller's process never loads sympy.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# a plain decimal number, optionally signed, with or without thousands separators (12,345.5)
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", re.ASCII)
MAX_ANSWER_CHARS = 1000  # longer final answers are not read: they score 0 rather than stall a training step
MAX_BRACE_DEPTH = 12  # nesting deeper than this is not a final answer a problem asks for
MAX_DIGITS = 20_000  # digits of any number an answer denotes (2^{66000}: 5 ms; 1000000!: 5.5 million digits)
MAX_ROOT_DIGITS = 200  # digits of a number under a root, which sympy factors (400 digits: 50 ms)
MAX_TERMS = 40  # terms of an expanded power of a sum, or of a sum with numeric bounds ((x+1)^{100}: 0.2 s)
CPU_LIMIT_S = 0.1  # CPU time a child may spend on one answer
WALL_LIMIT_S = 0.5  # wall-clock time a child may take to answer, or be killed (a long step in C, starvation)
STARTUP_TIMEOUT_S = 300.0  # importing sympy from a slow shared filesystem can take a while

log = logging.getLogger(__name__)


# --- the estimate -------------------------------------------------------------------------------------------
class _TooCostly(Exception):
    """Raised by the estimate as soon as one value is over a limit."""


@dataclass(frozen=True)
class _Size:
    """What the estimate knows of a value: `digits` bounds log10 of its numerator and denominator (of its
    numeric coefficients when `symbolic`), so also log10 of its magnitude."""

    digits: float = 0.0
    symbolic: bool = False  # holds a symbol or function: its value is no number
    integral: bool = True  # a whole number, so a power by it takes no root
    terms: float = 1.0  # additive terms once multiplied out, which a power of it multiplies again
    big_operator: bool = False  # a sum or product, whose upper bound counts its terms


_LOG2 = math.log10(2)
# digits are ASCII ones: another script's digit (`٠`, `⓷`) is a symbol, which `int` may not read
_TOKEN = re.compile(r"\d+(?:\.\d*)?|\.\d+|\\[a-zA-Z]+|\\.|\S", re.ASCII)
_OPEN = {"{", "(", "[", "\\{", "\\lbrace", "\\lfloor", "\\lceil", "\\langle", "\\lvert"}
_CLOSE = {"}", ")", "]", "\\}", "\\rbrace", "\\rfloor", "\\rceil", "\\rangle", "\\rvert"}
_IGNORED = {"\\left", "\\right", "\\big", "\\Big", "\\bigg", "\\Bigg", "\\bigl", "\\bigr", "\\Bigl",
            "\\Bigr", "\\biggl", "\\biggr", "\\displaystyle", "\\textstyle", "\\,", "\\;", "\\:", "\\!",
            "\\ ", "\\quad", "\\qquad", "'", "\\prime", "%", "\\%", "$", "\\$", "~"}  # fmt: skip
_PLUS = {"+", "-", "\\pm", "\\mp"}
_TIMES, _DIVIDE = {"*", "\\cdot", "\\times", "\\ast"}, {"/", "\\div"}
_SEPARATORS = {"\\le", "\\ge", "\\leq", "\\geq", "\\leqslant", "\\geqslant", "\\lt", "\\gt", "\\ne",
               "\\neq", "\\approx", "\\sim", "\\equiv", "\\in", "\\notin", "\\cup", "\\cap", "\\setminus",
               "\\mid", "\\to", "\\rightarrow", "\\Rightarrow", "\\implies", "\\iff", "\\subset",
               "\\subseteq", "\\\\", "\\choose", "\\text", "\\mbox", "\\textbf", "\\textit"}  # fmt: skip
_FRACTIONS = {"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"}
_BINOMIALS = {"\\binom", "\\dbinom", "\\tbinom"}
_BIG_OPERATORS = {"\\sum", "\\prod"}


def _checked(size: _Size) -> _Size:
    if size.digits > MAX_DIGITS:
        raise _TooCostly
    return size


def _bound(size: _Size) -> float:
    """An upper bound of the magnitude of a numeric value (inf where it does not fit a float)."""
    return 10.0**size.digits if size.digits < 300 else math.inf


def _either(a: _Size, b: _Size) -> _Size:
    """Two values computed one after the other (`a, b`, `a = b`, ...): the larger one costs."""
    return _Size(max(a.digits, b.digits), a.symbolic or b.symbolic, False, max(a.terms, b.terms))


def _add(a: _Size, b: _Size) -> _Size:
    return _checked(_Size(max(a.digits, b.digits) + _LOG2, a.symbolic or b.symbolic,
                          a.integral and b.integral, a.terms + b.terms))  # fmt: skip


def _multiply(a: _Size, b: _Size, divide: bool = False) -> _Size:
    return _checked(_Size(a.digits + b.digits, a.symbolic or b.symbolic,
                          a.integral and b.integral and not divide, a.terms * b.terms))  # fmt: skip


def _power(base: _Size, exponent: _Size) -> _Size:
    """`base^exponent`: sympy computes a numeric power exactly, takes a root by factoring, and may multiply
    out a power of a sum."""
    if exponent.symbolic:
        return _Size(base.digits, True, False)
    times = _bound(exponent)
    if base.big_operator:  # `\sum_{i=1}^{n}` adds n terms
        if times > MAX_TERMS:
            raise _TooCostly
        return _Size(base.digits, True, False)
    if not exponent.integral and not base.symbolic and base.digits > MAX_ROOT_DIGITS:
        raise _TooCostly
    if base.symbolic and base.terms > 1:  # a sum of t terms to the n-th power has C(n + t - 1, t - 1)
        t, n = base.terms, min(times, 1e6)
        if math.lgamma(n + t) - math.lgamma(t) - math.lgamma(n + 1) > math.log(MAX_TERMS):
            raise _TooCostly
    digits = 0.0 if base.digits == 0 else base.digits * times
    return _checked(_Size(digits, base.symbolic, base.integral and exponent.integral))


def _factorial(n: _Size) -> _Size:
    if n.symbolic:
        return _Size(n.digits, True, False)
    count = _bound(n)
    return _checked(_Size(math.inf if count > 1e12 else math.lgamma(count + 1) / math.log(10)))


def _binomial(n: _Size, k: _Size) -> _Size:
    if n.symbolic or k.symbolic:
        return _Size(max(n.digits, k.digits), True, False)
    return _checked(_Size(min(_bound(k) * n.digits, _bound(n) * _LOG2)))


def _root(radicand: _Size) -> _Size:
    if not radicand.symbolic and radicand.digits > MAX_ROOT_DIGITS:
        raise _TooCostly
    return _Size(radicand.digits, radicand.symbolic, False)


def _number(token: str) -> _Size:
    whole, _, fraction = token.partition(".")
    digits = (whole + fraction).lstrip("0")
    if fraction:  # `d.ddd` is the fraction dddd / 10^k
        return _Size(max(len(digits) - 1, len(fraction)) + 1, integral=False)
    return _Size(math.log10(int(digits)) if digits else 0.0)


class _Estimate:
    """A forgiving recursive-descent reading of LaTeX that sizes every value instead of computing it. It never
    fails on what it does not know: an unknown command is a symbol, an unknown character separates values."""

    def __init__(self, text: str):
        self.tokens = [token for token in _TOKEN.findall(text) if token not in _IGNORED]
        self.position = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str | None:
        token = self.peek()
        self.position += token is not None
        return token

    def nested(self, read):
        self.depth += 1
        if self.depth > MAX_BRACE_DEPTH:
            raise _TooCostly
        try:
            return read()
        finally:
            self.depth -= 1

    def everything(self) -> None:
        while self.peek() is not None:
            self.values()
            self.take()  # a closing bracket that opened nothing

    def values(self) -> _Size:
        """Values separated by commas, relations and the like."""
        size = self.sum()
        while (token := self.take()) is not None:
            if token in _CLOSE:
                self.position -= 1
                break
            other = self.sum()
            size = _binomial(size, other) if token == "\\choose" else _either(size, other)
        return size

    def sum(self) -> _Size:
        size = self.product()
        while self.peek() in _PLUS:
            self.take()
            size = _add(size, self.product())
        return size

    def product(self) -> _Size:
        size = self.signed()
        while (token := self.peek()) is not None:
            if token in _TIMES or token in _DIVIDE:
                self.take()
                size = _multiply(size, self.signed(), divide=token in _DIVIDE)
            elif self.starts_value(token):  # juxtaposition: `2x`, `3(4)`, `2^{10}3^{5}`
                size = _multiply(size, self.signed())
            else:
                break
        return size

    def signed(self) -> _Size:
        while self.peek() in _PLUS:
            self.take()
        return self.power()

    def power(self) -> _Size:
        size = self.postfix(self.atom())
        while (operator := self.peek()) in ("_", "^"):
            self.take()
            if operator == "_":  # a subscript names, it does not compute: `x_{1}`, `\log_2`
                self.nested(self.atom)
                continue
            braced = self.peek() == "{"
            exponent = self.nested(self.exponent)
            raised = _power(size, exponent)
            if not braced and self.peek() == "!":  # `2^3!`: (2^3)! or 2^(3!), whichever is larger
                self.take()
                raised = max(_factorial(raised), _power(size, _factorial(exponent)), key=lambda s: s.digits)
            size = self.postfix(raised)
        return size

    def exponent(self) -> _Size:
        """What `^` raises to: a group or one token, itself raised in turn (`2^2^2` is a tower)."""
        while self.peek() in _PLUS:
            self.take()
        size = self.atom()
        if self.peek() == "^":
            self.take()
            size = _power(size, self.nested(self.exponent))
        return size

    def postfix(self, size: _Size) -> _Size:
        while self.peek() == "!":
            self.take()
            size = _factorial(size)
        return size

    @staticmethod
    def starts_value(token: str) -> bool:
        if token in _OPEN or token[0].isalnum() or token[0] == ".":
            return True
        return token.startswith("\\") and token not in _CLOSE | _PLUS | _TIMES | _DIVIDE | _SEPARATORS

    def argument(self) -> _Size:
        """One argument of a command: a group or a single token."""
        return self.nested(self.atom)

    def group(self) -> _Size:
        self.take()
        size = self.values()
        self.take()
        return size

    def atom(self) -> _Size:
        token = self.peek()
        if token is None or token in _CLOSE:
            return _Size()
        if token in _OPEN:
            return self.nested(self.group)
        self.take()
        if token[0] in "0123456789.":  # ASCII digits, as `_TOKEN` reads numbers
            return _number(token)
        if token in _FRACTIONS:
            return _multiply(self.argument(), self.argument(), divide=True)
        if token in _BINOMIALS:
            return _binomial(self.argument(), self.argument())
        if token == "\\sqrt":
            if self.peek() == "[":
                self.nested(self.group)
            return _root(self.argument())
        return _Size(symbolic=True, big_operator=token in _BIG_OPERATORS)


@functools.lru_cache(maxsize=4096)  # a group's completions share one reference answer
def too_costly(text: str) -> bool:
    """Whether reading `text` could take sympy long: too long, nested too deep, or denoting a value over the
    limits above."""
    if len(text) > MAX_ANSWER_CHARS:
        return True
    try:
        _Estimate(text).everything()
    except _TooCostly:
        return True
    return False


# --- the child processes ------------------------------------------------------------------------------------
class _Checker:
    """One child process that reads and compares answers, and the pipes to it."""

    def __init__(self) -> None:
        self._errors = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "rlvr.answers"],
            cwd=Path(__file__).resolve().parents[1],  # this very package, wherever it is installed
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            bufsize=0,
        )
        self._received = b""
        self._ready = False

    def _line(self, timeout: float) -> bytes | None:
        """The child's next line, or None when it exits or is silent for `timeout` seconds."""
        stdout = self._process.stdout
        deadline = time.monotonic() + timeout
        while b"\n" not in self._received:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([stdout], [], [], remaining)[0]:
                return None
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                return None
            self._received += chunk
        line, _, self._received = self._received.partition(b"\n")
        return line

    def _start(self) -> None:
        if self._line(STARTUP_TIMEOUT_S) != b"ready":
            self.close()
            self._errors.seek(0)
            said = self._errors.read().decode(errors="replace").strip().splitlines()
            raise RuntimeError(
                "the math-verify process that checks answers did not start"
                + (f": {said[-1]}" if said else f" within {STARTUP_TIMEOUT_S:.0f} s")
            )
        self._ready = True

    def ask(self, request: list) -> bool | None:
        """The child's verdict on `[CPU limit, kind, answer, solution]`, or None when it ran out of time
        (it is then gone or going)."""
        if not self._ready:
            self._start()
        data = json.dumps(request).encode() + b"\n"
        try:
            while data:
                data = data[os.write(self._process.stdin.fileno(), data) :]
        except OSError:
            return None
        line = self._line(WALL_LIMIT_S)
        return None if line in (None, b"0-") else line == b"1"

    def close(self) -> None:
        self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._errors):
            stream.close()


class _Pool:
    """The idle checkers of one process: a caller takes one (or starts one), and gives it back unless it ran
    out of time, in which case a fresh one starts at once, to be warm by the next answer."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._idle: list[_Checker] = []
        self._lock = threading.Lock()

    def _take(self) -> _Checker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Checker()

    def _give(self, checker: _Checker) -> None:
        with self._lock:
            self._idle.append(checker)

    def start(self) -> None:
        self._give(self._take())

    def ask(self, request: list) -> bool:
        checker = self._take()
        verdict = checker.ask(request)
        if verdict is None:
            checker.close()
            log.debug("an answer took longer than its budget to check; it scores 0: %.80r", request[2])
            checker = _Checker()
        self._give(checker)
        return bool(verdict)

    def close(self) -> None:
        if self.pid != os.getpid():  # a forked copy: the checkers belong to the parent
            return
        with self._lock:
            idle, self._idle = self._idle, []
        for checker in idle:
            checker.close()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool()
            atexit.register(_POOL.close)
        return _POOL


def start() -> None:
    """Start a checker now (if none is idle), so that it is warm by the first answer."""
    _pool().start()


def answer_is_correct(answer: str, solution: str) -> bool:
    """Whether the boxed answer in `answer` (a completion's answer span) equals `solution` (math-verify), at a
    bounded cost: False when either would cost too much to read."""
    if not answer or too_costly(answer) or too_costly(solution):
        return False
    return _pool().ask([CPU_LIMIT_S, "correct", answer, solution])


def final_number(answer: str) -> str | None:
    """The last plain number written in `answer` (thousands separators dropped), or None."""
    numbers = _NUMBER.findall(answer or "")
    return numbers[-1].replace(",", "") if numbers else None


def lenient_is_correct(answer: str, solution: str) -> bool:
    """Whether `answer` is right by a lenient reading: its boxed answer is correct (`answer_is_correct`), or
    its final number equals `solution` (math-verify), boxed or not; at a bounded cost.

    A chat model that was never asked for `\\boxed{}` answers `... = 12.`: strict accuracy scores it 0, so a
    policy that merely learns the format would look like one that learns the task. This reading separates the
    two; it can also credit a number that was not meant as the answer, so it is a lower bar, not a better one.
    """
    if answer_is_correct(answer, solution):
        return True
    number = final_number(answer)
    if number is None or too_costly(number) or too_costly(solution):
        return False
    return _pool().ask([CPU_LIMIT_S, "number", number, solution])


def has_answer(answer: str | None) -> bool:
    """Whether a completion's answer span states a boxed answer math-verify reads (at a bounded cost)."""
    if not answer or too_costly(answer):
        return False
    return _pool().ask([CPU_LIMIT_S, "answered", answer, ""])


def same_answer(first: str, second: str) -> bool:
    """Whether two completions' answer spans state equal boxed answers (math-verify, at a bounded cost)."""
    if not first or not second or too_costly(first) or too_costly(second):
        return False
    return _pool().ask([CPU_LIMIT_S, "same", first, second])


def readable_answer(answer: str) -> bool:
    """Whether math-verify reads `answer`, boxed as a completion states it, as a value (at a bounded cost)."""
    if not answer.strip() or too_costly(answer):
        return False
    return _pool().ask([CPU_LIMIT_S, "readable", answer, ""])


# --- inside a child -----------------------------------------------------------------------------------------
# equivalent pairs of the shapes answers take: sympy's first comparison of a shape imports and caches for
# up to 0.1 s, which must not count against an answer
_WARM_UP = [
    ("42", "42"), ("-3", "-3"), ("0.5", "\\frac{1}{2}"), ("2\\pi", "2\\pi"), ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\frac{1+\\sqrt{5}}{2}", "\\frac{\\sqrt{5}+1}{2}"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("(1,2]", "(1, 2]"), ("(3, 4)", "(3,4)"), ("\\{1,2\\}", "\\{2,1\\}"), ("x^2-1", "(x-1)(x+1)"),
    ("\\frac{x^2-1}{x-1}", "x+1"), ("(x+1)^{3}", "x^3+3x^2+3x+1"), ("y=2x+1", "y=1+2x"),
    ("x \\le 2", "x \\leq 2"), ("x \\in [1, 3)", "[1,3)"), ("10\\%", "0.1"), ("90^\\circ", "90"),
    ("\\text{(A)}", "A"), ("\\infty", "\\infty"), ("e^{i\\pi}", "-1"), ("\\log_2 8", "3"),
    ("\\sin^2 x + \\cos^2 x", "1"), ("2^{10}", "1024"), ("5!", "120"), ("\\binom{5}{2}", "10"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
]  # fmt: skip


_HEALTH_CHECK = [("42", "42"), ("\\frac{1}{2}", "0.5"), ("x^2-1", "(x-1)(x+1)")]


class _OutOfTime(BaseException):
    """Raised in a child when an answer has used its CPU time; not an `Exception`, so that no `except
    Exception` in sympy or math-verify swallows it."""


def _out_of_time(signum, frame) -> None:
    raise _OutOfTime


@functools.lru_cache(maxsize=4096)
def _read_boxed(answer: str) -> tuple:
    """math-verify's reading of `answer` boxed (a bare `2\\pi` or `3, 4` would be read as one plain number of
    it); empty when it reads no value. Reference answers repeat across a group's completions: kept."""
    from math_verify import parse

    parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return tuple(parsed) if any(not isinstance(value, str) for value in parsed) else ()


@functools.lru_cache(maxsize=4096)
def _read_stated(answer: str) -> tuple:
    """math-verify's reading of the boxed answer a completion's answer span states; empty when none. A
    problem's samples are read once each, however many comparisons grouping them makes."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse

    extraction = LatexExtractionConfig(
        normalization_config=NormalizationConfig(units=True),
        boxed_match_priority=0,  # the boxed answer wins over any other expression in the text
        try_extract_without_anchor=False,
    )
    return tuple(parse(answer, [extraction], extraction_mode="first_match", parsing_timeout=None))


def _verdict(kind: str, answer: str, other: str) -> bool:
    """`readable`: `answer` read boxed is a value; `answered`: the span `answer` states one; `same`: the spans
    `answer` and `other` state equal ones; `correct`: the span `answer` states the solution `other`;
    `number`: the number `answer`, read boxed, equals the solution `other`."""
    from math_verify import verify

    try:
        if kind == "readable":
            return bool(_read_boxed(answer))
        if kind == "answered":
            return bool(_read_stated(answer))
        gold = _read_stated(other) if kind == "same" else _read_boxed(other)
        predicted = _read_boxed(answer) if kind == "number" else _read_stated(answer)
        if not gold or not predicted:
            return False
        return bool(verify(list(gold), list(predicted), timeout_seconds=None))
    except Exception:  # sympy raises many types for what it cannot read or compare; that answer is wrong
        return False


def _timed(limit: float, kind: str, answer: str, solution: str) -> bool | None:
    """The verdict, or None when it took more than `limit` seconds of CPU time (SIGPROF interrupts sympy
    between two Python steps; a step in C runs on until the caller's wall-clock limit kills the process)."""
    try:
        try:
            signal.setitimer(signal.ITIMER_PROF, limit)
            return _verdict(kind, answer, solution)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    except _OutOfTime:
        return None


def _verdicts(pairs) -> list[bool]:
    """Verdicts on answers stated as completions state them."""
    return [_verdict("correct", f"So \\boxed{{{answer}}}.", solution) for answer, solution in pairs]


def _serve() -> None:
    """A child's life: warm up, then one line per request: `1` or `0`, or `0-` when an interrupted
    computation left it unable to check answers it checked before (sympy caches as it goes), so it retires."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the caller, whose exit closes stdin
    signal.signal(signal.SIGPROF, _out_of_time)
    logging.disable(logging.CRITICAL)  # math-verify warns on every answer it cannot read
    _verdicts(_WARM_UP + [(answer, "7") for answer, _ in _WARM_UP])
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        verdict = _timed(*json.loads(line))
        healthy = verdict is not None or all(_verdicts(_HEALTH_CHECK))
        out.write(b"1\n" if verdict else b"0\n" if healthy else b"0-\n")
        out.flush()
        if not healthy:
            return


if __name__ == "__main__":
    _serve()
