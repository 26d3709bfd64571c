"""A model's answers scored 0-100 by a judge model behind any OpenAI-compatible server (a minigpt server,
llama-server, ollama's /v1), as the from-scratch book scores its fine-tuned model with ollama: the
judge sees the instruction, the reference answer and the model's answer, at temperature 0 with a
fixed seed, and is asked for an integer only. Replies without a number in 0..100 are counted as
unparsable, not fatal; a judge that does not answer within the timeout is an error.

Questions: a JSON list or JSONL of records with "instruction" (or "question" / "prompt"), an optional
"input", and "output" (or "reference" / "answer") as the reference answer: the Alpaca layout.
"""
from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError, DataError

__all__ = ["JUDGE_PROMPT", "read_questions", "parse_score", "ask_judge", "judge_answers"]

JUDGE_PROMPT = ("Given the input `{prompt}` and correct output `{reference}`, score the model response "
                "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")
_QUESTION_KEYS, _REFERENCE_KEYS = ("instruction", "question", "prompt"), ("output", "reference", "answer")


def _first(record: dict, keys: tuple) -> Optional[str]:
    return next((record[k] for k in keys if isinstance(record.get(k), str) and record[k].strip()), None)


def read_questions(path) -> list[dict]:
    """[{"instruction", "input", "reference"}] from a JSON list or JSONL file; DataError (one line)
    for a missing file, bad JSON or a record without a question or a reference answer."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"--questions {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise DataError(f"--questions {path}: not JSON or JSONL ({e})") from None
    out = []
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise DataError(f"--questions {path}: record {i} is not an object")
        q, ref = _first(r, _QUESTION_KEYS), _first(r, _REFERENCE_KEYS)
        if q is None or ref is None:
            missing = "/".join(_QUESTION_KEYS if q is None else _REFERENCE_KEYS)
            raise DataError(f"--questions {path}: record {i} has no {missing} field")
        out.append({"instruction": q, "input": r.get("input") or "", "reference": ref})
    if not out:
        raise DataError(f"--questions {path}: no questions")
    return out


def parse_score(reply: str) -> Optional[float]:
    """The first number in `reply` when it lies in 0..100, else None."""
    m = re.search(r"-?\d+(?:\.\d+)?", reply or "")
    if m is None:
        return None
    v = float(m.group())
    return v if 0 <= v <= 100 else None


def _endpoint(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def ask_judge(url: str, prompt: str, *, model: str = "judge", api_key: Optional[str] = None,
              timeout: float = 60.0, seed: int = 123, max_tokens: int = 8) -> str:
    """The judge's reply text to one user message (temperature 0, `seed`). ConfigError (one line) when
    the server cannot be reached or does not answer within `timeout`; an HTTP error reply comes back
    as the text "error: ..." (counted as unparsable by the caller)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "seed": seed, "max_tokens": max_tokens}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(_endpoint(url), data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            reply = json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        return f"error: HTTP {e.code}"
    except (socket.timeout, TimeoutError):
        raise ConfigError(f"--judge {url}: no answer within {timeout:g} s") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise ConfigError(f"--judge {url}: no answer within {timeout:g} s") from None
        raise ConfigError(f"--judge {url}: cannot connect ({e.reason})") from None
    except ValueError:
        return "error: not JSON"
    try:
        return reply["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return "error: no choices"


def judge_answers(answer: Callable[[dict], str], questions: list[dict], url: str, *, progress: bool = False,
                  **judge_kw) -> dict:
    """Answer each question with answer(question) -> text, have the judge score it.
    Returns {"judge_score" (mean over parsed scores, None if none), "judged", "unparsable", "items"}."""
    from tqdm.auto import tqdm

    items, scores = [], []
    for q in tqdm(questions, unit="q", disable=not progress, desc="judge"):
        response = answer(q)
        shown = q["instruction"] + (f"\n\n{q['input']}" if q["input"] else "")
        reply = ask_judge(url, JUDGE_PROMPT.format(prompt=shown, reference=q["reference"], response=response),
                          **judge_kw)
        score = None if reply.startswith("error: ") else parse_score(reply)
        if score is not None:
            scores.append(score)
        items.append({**q, "response": response, "judge_reply": reply, "score": score})
    return {"judge_score": sum(scores) / len(scores) if scores else None, "judged": len(questions),
            "unparsable": len(questions) - len(scores), "items": items}
