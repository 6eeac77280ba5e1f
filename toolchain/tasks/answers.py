"""Answer extraction for the generative tasks, the rules lm-eval's tasks score with.

GSM8K (lm-eval's gsm8k-cot): the number after "The answer is" (strict) or, failing a strict match, the last
number in the text (flexible); both compared after dropping commas, dollar signs and a final period.
MATH (Minerva): the text after "Final Answer: The final answer is", normalised (units, \\text, \\boxed, spaces,
shorthand \\frac/\\sqrt removed or completed), then equal as strings or by sympy after parsing the LaTeX.
"""
from __future__ import annotations

import re

GSM8K_STRICT = r"The answer is (\-?[0-9\.\,]+)."
GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")
INVALID = "[invalid]"
# lm-eval's Minerva extraction (minerva_math/utils.py: get_unnormalized_answer), which appends MATH_END to the
# text first, so a generation that stops after "is X. " and before MATH_END still has its answer.
MATH_FINAL = r"Final Answer: The final answer is(.*?). I hope it is correct."
MATH_END = "I hope it is correct."


def gsm8k_target(answer: str) -> str:
    """The gold number of a GSM8K answer: what follows its `####`."""
    return answer.split("####")[-1].strip()


def gsm8k_extract(text: str, strict: bool = True) -> str:
    """The predicted number: the first strict match, or (flexible) the last number-like run."""
    if strict:
        match = re.search(GSM8K_STRICT, text)
        return match.group(1) if match else INVALID
    matches = re.findall(GSM8K_FLEXIBLE, text)
    if not matches:
        return INVALID
    last = matches[-1]
    return next((group for group in last if group), INVALID) if isinstance(last, tuple) else last


def answer_end(task: str, text: str) -> int | None:
    """Where the answer the task's strict extraction reads ends in `text` (the first match, the one scored), or
    None when there is none. The text after it does not change the score."""
    if task == "gsm8k":
        match = re.search(GSM8K_STRICT, text)
    elif task == "math500":
        match = re.search(MATH_FINAL, text + MATH_END)
    else:
        raise ValueError(f"no answer extraction for task {task!r}")
    return None if match is None else min(match.end(), len(text))


def gsm8k_normalise(number: str) -> str:
    for pattern in GSM8K_IGNORE:
        number = re.sub(pattern, "", number)
    return number.strip().lower()


def gsm8k_correct(text: str, answer: str, strict: bool = True) -> bool:
    return gsm8k_normalise(gsm8k_extract(text, strict)) == gsm8k_normalise(gsm8k_target(answer))


def boxed_answer(solution: str) -> str:
    """The content of the last \\boxed{...} (or \\fbox{...}) of a solution, braces balanced; \\boxed 5 too."""
    start = max(solution.rfind("\\boxed"), solution.rfind("\\fbox"))
    if start < 0:
        raise ValueError("no \\boxed{} in the solution")
    head = solution[start:]
    if head.startswith("\\boxed ") :
        return head[len("\\boxed "):].split("$")[0].strip()
    brace = head.find("{")
    depth = 0
    for i in range(brace, len(head)):
        depth += {"{": 1, "}": -1}.get(head[i], 0)
        if depth == 0:
            return head[brace + 1:i]
    raise ValueError("unbalanced braces in the solution's \\boxed{}")


def math_final_answer(generation: str) -> str:
    """The model's final answer as Minerva's prompt asks for it, normalised."""
    from lm_eval.tasks.minerva_math.utils import get_unnormalized_answer, normalize_final_answer

    return normalize_final_answer(get_unnormalized_answer(generation))


def math_correct(generation: str, solution: str) -> bool:
    """Minerva's exact match: the normalised final answer equals the normalised boxed gold answer, as strings
    or as sympy expressions."""
    from lm_eval.tasks.minerva_math.utils import is_equiv, normalize_final_answer

    return bool(is_equiv(math_final_answer(generation), normalize_final_answer(boxed_answer(solution))))
