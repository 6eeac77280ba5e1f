"""Why a generated answer is wrong: a rule-based failure taxonomy, and per-item flips between two models.

The task scores the first answer its strict extraction reads (`answers.answer_end`), so a wrong answer is
judged on the generation up to the end of that answer; what the model writes after it cannot change the score.
It falls in the first class whose rule matches, in this order:
- `truncation`: no answer, and the generation ran into the token cap; or the text up to the answer (the whole
  generation when there is none) is stuck in a repetition loop (the same chunk of at least LOOP_MIN_CHARS
  characters three times in a row, or one line of at least LOOP_MIN_CHARS characters LOOP_LINES times);
- `format`: no answer in the form the task asks for ("The answer is N." for GSM8K, "Final Answer: The final
  answer is ..." for MATH), so the strict extraction finds nothing;
- `arithmetic`: an equation "a op b ... = c" before the answer whose left side does not compute to c
  (`arithmetic_slips`; LaTeX math is read as the arithmetic it writes, `\\frac{a}{b}`, `\\cdot`, `\\times`,
  `2^{3}`; an expression cut out of notation the checker does not compute, such as a term after `\\dots` or
  the argument of `\\sqrt{..}`, is skipped rather than guessed at);
- `reasoning`: the rest: a well-formed answer reached by correct arithmetic on a wrong path.

Truncation comes first because a cut-off or looping generation has no answer for that reason; format before
arithmetic because an answer that cannot be read is wrong whatever its arithmetic. A generation that answers
and then runs on (to the cap, or looping: a compressed model that no longer stops) is counted apart, right or
wrong (`runs_on`): it costs tokens, not the answer.
"""
from __future__ import annotations

import ast
import operator
import re

CLASSES = ("truncation", "format", "arithmetic", "reasoning")

LOOP_MIN_CHARS = 12   # a repeated chunk shorter than this is ordinary text ("1, 1, 1"), not a loop
LOOP_MAX_CHARS = 200
LOOP_LINES = 3

# A number as chains of thought write it: optional $, thousands separators, decimals.
_NUMBER = r"\$?\d[\d,]*(?:\.\d+)?"
# An equation's right side, then (scanning backwards from its "=") the characters a left side may hold.
_EQUATION = re.compile(r"=\s*(-?" + _NUMBER + r")")
# A stated number that goes on as an expression ("= 14 * 301", "= 2^{3}", "= 3(4)") is not the value by itself.
_CONTINUED = re.compile(r"\s*[\\^_{(*×/÷]")
# Characters that end a notation the checker does not compute ("\\frac{a}{b}(3 + 4)", "x^{2} (3 - 1)"): an
# expression right after one is a fragment of a larger one.
_NOTATION_END = set("}^_\\")
_LEFT_CHARS = set("0123456789.,+-*/×xX÷()$ ")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
MATH_X = "\U0001d465"     # mathematical italic small x
POWER_MAX_EXPONENT = 64   # a larger exponent is not hand arithmetic, and its value would not fit a float

# LaTeX math: the segments ($..$, $$..$$, \(..\), \[..\]) whose arithmetic is rewritten in the plain form the
# checker reads. A segment without markup is left as it is: a pair of currency signs ("$5 and $7") is not math.
_MATH_SEGMENT = re.compile(r"(?<!\\)\$\$(.*?)(?<!\\)\$\$"              # $$..$$ (an escaped \$ is a dollar sign)
                           r"|(?<!\\)\$((?:[^$]|(?<=\\)\$)*?)(?<!\\)\$"   # $..$
                           r"|\\\((.*?)\\\)|\\\[(.*?)\\\]", re.S)        # \(..\), \[..\]
_LATEX_OPERATOR = re.compile(r"\\(?:times|cdot|div)(?![A-Za-z])")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])")
_FRACTION = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_POWER = re.compile(r"(?<=[\d)])\s*\^\s*(?:\{([^{}]*)\}|(\d))")
# A number or a closing parenthesis directly before "(" multiplies it: "3(4 + 1)", "(2)(5)".
_IMPLIED_PRODUCT = re.compile(r"(?<=[\d)])\s*(?=\()")


def _number(text: str) -> float:
    return float(_THOUSANDS.sub("", text.replace("$", "")))


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _evaluate(node.left), _evaluate(node.right)
        if abs(exponent) > POWER_MAX_EXPONENT or (base < 0 and exponent != int(exponent)):
            raise ValueError("not hand arithmetic")
        return base ** exponent
    raise ValueError("not arithmetic")


def _plain_math(segment: str) -> str:
    """A LaTeX math segment's arithmetic in plain form: `\\frac{a}{b}` as ((a)/(b)), `\\cdot` and `\\times` as
    *, `\\div` as /, `2^{3}` as 2**(3), `\\left(`/`\\right)` as parentheses, a product written by juxtaposition
    with *. Anything else (a variable, `\\sqrt`, `\\dots`) stays, and the checker skips the expressions next to it."""
    # In math an x is a variable, never a times sign: the math-italic letter keeps the plain-text rule
    # ("3 x 4") from reading it as one.
    text = segment.replace("{,}", ",").replace("x", MATH_X).replace("X", MATH_X)
    text = _LATEX_SPACE.sub(" ", text)
    text = re.sub(r"\\left\s*\(|\\bigl?\s*\(", "(", text)
    text = re.sub(r"\\right\s*\)|\\bigr?\s*\)", ")", text)
    text = _LATEX_OPERATOR.sub(lambda m: " / " if m.group(0) == "\\div" else " * ", text)
    while True:   # innermost first: the pattern takes only braces with no braces inside
        rewritten = _FRACTION.sub(r"((\1)/(\2))", text)
        if rewritten == text:
            break
        text = rewritten
    text = _POWER.sub(lambda m: "**(" + (m.group(1) if m.group(1) is not None else m.group(2)) + ")", text)
    return _IMPLIED_PRODUCT.sub("*", text)


def plain_arithmetic(text: str) -> str:
    """`text` with each LaTeX math segment that holds markup rewritten by `_plain_math`, its delimiters as spaces."""
    def rewrite(match: re.Match) -> str:
        inner = next(group for group in match.groups() if group is not None)
        if not any(mark in inner for mark in "\\^{"):
            return match.group(0)
        return " " + _plain_math(inner) + " "
    return _MATH_SEGMENT.sub(rewrite, text)


def _plain_expression(raw: str) -> str:
    """A run of text as a Python expression: no thousands separators or dollar signs, × ÷ and a spaced x as
    operators."""
    raw = _THOUSANDS.sub("", raw).replace("$", "").replace("×", "*").replace("÷", "/")
    return re.sub(r"(?<=[\d)\s])[xX](?=[\s\d(])", "*", raw).strip()


def _left_side(text: str, end: int) -> str | None:
    """The arithmetic expression that ends at `end` (just before an "="), or None when there is none: at
    least one operator between numbers, read back to the first character an expression cannot hold."""
    start = end
    while start > 0 and text[start - 1] in _LEFT_CHARS:
        start -= 1
    if start > 0 and (text[start - 1] in _NOTATION_END or _after_latex_command(text, start)):
        return None
    # A comma that is not a thousands separator separates clauses: the expression is what follows it.
    clause = [m.end() for m in re.finditer(r",(?!\d{3}(?!\d))", text[start:end])]
    if clause:
        start += clause[-1]
    # The run may start inside a word ("box 3 + 4": "x 3 + 4"): the expression starts at its first number. An
    # operator before that number ("a * 1 + 1") means the expression goes on over a variable, and a parenthesis
    # or minus sign right after a letter ("f(1 + 2)", "a-1") belongs to a function or a variable.
    lead = re.match(r"[^\d(-]*", text[start:end]).group(0)
    first = start + len(lead)
    if re.search(r"[-+*/×÷)]", lead) or (first > 0 and text[first - 1].isalpha() and text[first] in "(-"):
        return None
    raw = _plain_expression(text[first:end])
    # Opening parentheses of an enclosing clause, "(so 3 + 4 = 7", are not part of the expression.
    while raw.count("(") > raw.count(")") and raw.startswith("("):
        raw = raw[1:].strip()
    if not re.match(r"^-?[\d(]", raw) or not re.search(r"[\d)]\s*[-+*/]\s*[\d(]", raw):
        return None
    return raw


def _after_latex_command(text: str, start: int) -> bool:
    """The run starts right after a LaTeX command's name ("\\dots 0 - 1"), which may take it as an argument."""
    i = start
    while i > 0 and text[i - 1].isalpha():
        i -= 1
    return i < start and i > 0 and text[i - 1] == "\\"


def _agrees(actual: float, stated_text: str) -> bool:
    """The computed value equals the stated one, allowing the rounding the stated number's decimals imply."""
    stated = _number(stated_text)
    decimals = len(stated_text.split(".")[1]) if "." in stated_text else 0
    tolerance = max(0.5 * 10 ** -decimals if decimals else 1e-9, 1e-9 * abs(actual))
    # An integer stated for a non-integer result ("10 / 3 = 3") is a slip; 3.33 for 10/3 is rounding.
    return abs(actual - stated) <= tolerance + 1e-12


def _right_side(text: str, start: int) -> tuple[str, float] | None:
    """The whole expression after an "=" (its first number at `start`) up to where it ends (the next "=", a word,
    a comma that separates clauses), with its value; None when it runs into notation the checker does not
    compute or is not plain arithmetic."""
    end = start
    while end < len(text) and text[end] in _LEFT_CHARS:
        end += 1
    if end < len(text) and (text[end] in _NOTATION_END or text[end] == "{"):
        return None
    raw = _plain_expression(re.split(r",(?!\d{3}(?!\d))", text[start:end], maxsplit=1)[0]).rstrip(".")
    try:
        return raw, _evaluate(ast.parse(raw, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, OverflowError):
        return None


def arithmetic_slips(text: str) -> list[tuple[str, str, float]]:
    """Every equation "expression = right side" in `text` whose expression does not compute to the right side:
    (expression, stated right side, computed value). Expressions are + - * / × ÷ x and powers over numbers and
    parentheses, LaTeX math read as such (`plain_arithmetic`); an equation that is not plain arithmetic (a
    variable, a unit inside, a percent) is skipped.

    A chain either runs on from a value ("3 + 4 = 7 + 1 = 8": 7 is 3 + 4) or rewrites the whole expression
    ("2^3 + 7 = 8 + 7 = 15"), so a link is a slip only when its expression equals neither the right side's first
    number nor the whole right side."""
    slips = []
    text = plain_arithmetic(text)
    for match in _EQUATION.finditer(text):
        continued = _CONTINUED.match(text, match.end()) is not None
        expression = _left_side(text, match.start())
        if expression is None:
            continue
        try:
            actual = _evaluate(ast.parse(expression, mode="eval"))
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, OverflowError):
            continue
        stated = match.group(1).replace("$", "").rstrip(",")
        if not continued and _agrees(actual, stated):
            continue
        whole = _right_side(text, match.start(1))
        if whole is None:
            if not continued:
                slips.append((expression, stated, actual))
            continue
        if abs(actual - whole[1]) <= 1e-9 * max(1.0, abs(actual)) or _agrees(actual, stated):
            continue
        slips.append((expression, whole[0] if continued else stated, actual))
    return slips


def repetition_loop(text: str) -> bool:
    """True when the text is stuck: one chunk of LOOP_MIN_CHARS..LOOP_MAX_CHARS characters three times in a
    row, or one line of at least LOOP_MIN_CHARS characters LOOP_LINES times."""
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= LOOP_MIN_CHARS]
    if any(lines.count(line) >= LOOP_LINES for line in set(lines)):
        return True
    pattern = r"(.{%d,%d}?)\1\1" % (LOOP_MIN_CHARS, LOOP_MAX_CHARS)
    return re.search(pattern, text, re.S) is not None


def classify_failure(generation: str, answer_end: int | None, truncated: bool = False) -> str:
    """The class of a wrong answer (one of CLASSES). `answer_end`: where the answer the task's strict extraction
    reads ends (None: it reads none); `truncated`: the generation used every token it was allowed."""
    if answer_end is None:
        if truncated or repetition_loop(generation):
            return "truncation"
        return "format"
    judged = generation[:answer_end]
    if repetition_loop(judged):
        return "truncation"
    if arithmetic_slips(judged):
        return "arithmetic"
    return "reasoning"


def runs_on(generation: str, answer_end: int | None, truncated: bool = False) -> bool:
    """The generation gave its answer, then went on to the token cap or into a repetition loop instead of
    stopping."""
    return answer_end is not None and (truncated or repetition_loop(generation[answer_end:]))


def flips(reference: dict[int, bool], other: dict[int, bool]) -> dict:
    """Per-item changes from `reference` (dense) to `other`, both {item: correct}: the items that went from
    right to wrong and from wrong to right, and how many stayed right or wrong. Both must score the same items."""
    if set(reference) != set(other):
        raise ValueError(f"flips need the same items: {len(set(reference) ^ set(other))} differ")
    ids = sorted(reference)
    return {"right_to_wrong": [i for i in ids if reference[i] and not other[i]],
            "wrong_to_right": [i for i in ids if not reference[i] and other[i]],
            "both_right": sum(reference[i] and other[i] for i in ids),
            "both_wrong": sum(not reference[i] and not other[i] for i in ids)}


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the tie-averaged ranks); None for fewer than three pairs or a
    constant side, where it is undefined."""
    if len(x) != len(y):
        raise ValueError("spearman needs pairs")
    if len(x) < 3:
        return None
    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5
