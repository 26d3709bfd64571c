"""Evaluate a model: sliding-window perplexity and bits per byte of a text (--text; the fixed-length
method of the transformers docs), lm-evaluation-harness tasks in-process (--tasks), or its answers
scored 0-100 by a judge model (--judge, --questions).

examples:
  minigpt eval --model gpt2 --text wiki.test.raw --stride 1024           # gpt2 124M: about 29.9
  minigpt eval --model out-finetune --text notes.txt --json
  minigpt eval --model gpt2 --adapter out-finetune --quantize nf4 --text notes.txt
  minigpt eval --model gpt2 --tasks hellaswag --batch-size 16       # gpt2 124M: acc_norm about 0.31
  minigpt eval --model out-finetune --tasks my_task.yaml --limit 100 --num-fewshot 5 --json
  minigpt eval --model out-finetune --questions test.json --judge http://localhost:11434 \
      --judge-model llama3                                     # ollama (or llama-server, minigpt serve)
(`python -m minigpt eval ...` is the same command. Perplexity: every token is scored once, with up to
window - 1 tokens of context; --json prints {"perplexity", "bits_per_byte", "tokens"}. Judge: questions
are Alpaca records (instruction, optional input, output = the reference answer) in JSON or JSONL; the
model answers greedily, the judge scores at temperature 0 with --seed; --json prints {"judge_score",
"judged", "unparsable"}, replies without a number in 0..100 count as unparsable. Tasks: harness task
names and task YAML files, comma-separated, run by lm_eval with minigpt.inference.harness.MinigptLM
(needs pip install "minigpt[eval]"); --json prints {"results": lm_eval's results per task}. Progress
bars go to stderr. Library: minigpt.training.perplexity.sliding_window_perplexity,
minigpt.inference.harness, minigpt.inference.judge.)
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.templates import TEMPLATE_NAMES
from ..model.quant import QUANT_MODES
from .args import CLIError, check, command_main, field


@dataclass
class EvalArgs:
    model: Optional[str] = field(None, "any GPT.from_pretrained source (Hub name ORG/NAME, preset, HF/OpenAI dir, "
                                       ".gguf, train.py output) or a finetune output dir (default: newest "
                                       "out-finetune/, else out/)", metavar="SRC")
    revision: Optional[str] = field(None, "Hub revision of a --model ORG/NAME (or of the adapter's Hub base): "
                                          "a branch, tag or commit sha (default: main)", metavar="REV")
    adapter: Optional[str] = field(None, "adapter dir, any fine-tuning method (minigpt's or PEFT's; base: --model, "
                                         "else the adapter's base_model_name_or_path)", metavar="DIR")
    quantize: Optional[str] = field(None, "load the base quantized: nf4 or int8 (scoring stays fp32)",
                                    choices=QUANT_MODES)
    text: Optional[str] = field(None, "the UTF-8 text file to score", metavar="FILE")
    stride: Optional[int] = field(None, "tokens between window starts, 1..window (default: half the window)")
    max_length: Optional[int] = field(None, "tokens per window (default: the model's context)")
    batch_size: int = field(8, "windows per forward pass (--text); sequences per forward and generations "
                               "decoded together (--tasks)")
    tasks: Optional[str] = field(None, "lm-evaluation-harness tasks: names and task YAML files, comma-separated "
                                       "(instead of --text)", metavar="TASKS")
    num_fewshot: Optional[int] = field(None, "few-shot examples per task prompt (default: the task's own)",
                                       metavar="K")
    limit: Optional[float] = field(None, "documents per task: a count, or a fraction of the task when < 1")
    judge: Optional[str] = field(None, "score answers with the judge model at this OpenAI-compatible server URL "
                                       "(instead of --text)", metavar="URL")
    questions: Optional[str] = field(None, "questions for --judge: JSON or JSONL Alpaca records", metavar="FILE")
    judge_model: str = field("judge", "the model name sent to the judge server", metavar="NAME")
    api_key: Optional[str] = field(None, "bearer token for the judge server", metavar="KEY")
    judge_timeout: float = field(60.0, "seconds to wait for each judge reply")
    seed: int = field(123, "the judge's sampling seed (it runs at temperature 0)")
    max_new_tokens: int = field(256, "longest answer of the model to a question, in tokens")
    template: Optional[str] = field(None, "prompt template for the model's answers (default: the one it was tuned "
                                          "with, else alpaca)", choices=list(TEMPLATE_NAMES))
    json: bool = field(False, "print one JSON object (see below)")
    device: str = field("auto", "auto, cpu, cuda or cuda:N")
    threads: Optional[int] = field(None, "CPU threads for torch (default: all cores)", metavar="N")
    debug: bool = field(False, "show tracebacks")

    def __post_init__(self) -> None:
        modes = [f"--{m}" for m in ("text", "judge", "tasks") if getattr(self, m)]
        if len(modes) != 1:
            raise ValueError(f"give one of --text FILE (perplexity), --judge URL or --tasks TASKS, not both "
                             f"{modes[0]} and {modes[1]}" if modes else
                             "--text FILE is required (or --judge URL --questions FILE, or --tasks TASKS)")
        if (self.num_fewshot is not None or self.limit is not None) and not self.tasks:
            raise ValueError("--num-fewshot and --limit go with --tasks")
        check(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot", ">= 0", self.num_fewshot)
        check(self.limit is None or self.limit > 0, "limit", "> 0", self.limit)
        if self.judge and not self.questions:
            raise ValueError("--judge needs --questions FILE")
        if self.questions and not self.judge:
            raise ValueError("--questions needs --judge URL")
        check(self.judge_timeout > 0, "judge_timeout", "> 0", self.judge_timeout)
        check(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        check(self.stride is None or self.stride >= 1, "stride", ">= 1", self.stride)
        check(self.max_length is None or self.max_length >= 2, "max_length", ">= 2", self.max_length)
        check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check(self.threads is None or self.threads >= 1, "threads", "a positive integer", self.threads)
        if self.stride is not None and self.max_length is not None and self.stride > self.max_length:
            raise ValueError(f"--stride ({self.stride}) must not exceed --max-length ({self.max_length})")


def read_text(path: str) -> str:
    """The text of --text FILE, or a one-line CLIError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CLIError(f"--text {path}: no such file")
    if p.is_dir():
        raise CLIError(f"--text {path}: is a folder; give a text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"--text {path}: not UTF-8 text (byte {e.start})") from None


def evaluate(args: EvalArgs) -> int:
    """The body of `minigpt eval`: --text (perplexity) or --judge."""
    import torch

    from ..device import resolve_device
    from .common import load_model

    if args.tasks:
        tasks = _resolve_tasks(args.tasks)                  # lm-eval installed, the tasks known: before loading
    elif args.judge:
        from ..inference.judge import read_questions
        questions = read_questions(args.questions)
    else:
        text = read_text(args.text)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    loaded, template = load_model(args, device)
    if args.tasks:
        return _harness(args, loaded, tasks)
    if args.judge:
        return _judge(args, loaded, template, questions)
    return _perplexity(args, loaded, text, device)


def _perplexity(args: EvalArgs, loaded, text: str, device) -> int:
    from ..errors import ConfigError
    from ..training.perplexity import sliding_window_perplexity

    model = loaded.model
    context = model.context_length
    window = args.max_length or context
    if window > context:
        raise CLIError(f"--max-length {window} exceeds the model's context ({context} tokens)")
    if args.stride is not None and args.stride > window:
        raise CLIError(f"--stride {args.stride} exceeds the window ({window} tokens); use 1..{window}")
    try:
        r = sliding_window_perplexity(model, text, window=window, stride=args.stride, batch_size=args.batch_size,
                                      device=device, progress=True)
    except ConfigError as e:
        raise CLIError(f"--text {args.text}: {e}") from None
    if args.json:
        print(json.dumps({"perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"]}))
    else:
        print(f"model: {loaded.source}")
        print(f"perplexity {r['perplexity']:.4f}   bits per byte {r['bits_per_byte']:.4f}   "
              f"({r['tokens']} tokens scored, {r['bytes']} bytes; window {r['window']}, stride {r['stride']}, "
              f"{r['windows']} windows)")
    return 0


def _judge(args: EvalArgs, loaded, template, questions: list) -> int:
    from ..data.tokenizer import get_tokenizer
    from ..inference.chat import ChatSession
    from ..inference.judge import judge_answers

    tok = get_tokenizer()
    room = loaded.model.context_length // 2

    def answer(q: dict) -> str:
        session = ChatSession(loaded.model, tok, template=template, temperature=0.0,
                              max_new_tokens=min(args.max_new_tokens, room))
        return session.reply(q["instruction"] + (f"\n\n{q['input']}" if q["input"] else ""))

    r = judge_answers(answer, questions, args.judge, progress=True, model=args.judge_model, api_key=args.api_key,
                      timeout=args.judge_timeout, seed=args.seed)
    if args.json:
        print(json.dumps({"judge_score": r["judge_score"], "judged": r["judged"], "unparsable": r["unparsable"]}))
    else:
        score = "n/a" if r["judge_score"] is None else f"{r['judge_score']:.2f}"
        print(f"model: {loaded.source}   judge: {args.judge} ({args.judge_model})")
        print(f"judge score {score} / 100   ({r['judged']} questions, {r['unparsable']} judge replies unparsable)")
    return 0


def _resolve_tasks(spec: str):
    """(tasks, TaskManager) for lm_eval, or a one-line CLIError (lm-eval missing, a bad task)."""
    try:
        from ..inference.harness import resolve_tasks
    except ImportError:
        raise CLIError('--tasks needs lm-evaluation-harness: pip install "minigpt[eval]"') from None
    return resolve_tasks(spec)


def _harness(args: EvalArgs, loaded, tasks) -> int:
    import lm_eval
    from lm_eval.utils import make_table

    from ..errors import MinigptError
    from ..inference.harness import MinigptLM

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    lm = MinigptLM(loaded.model, batch_size=args.batch_size)
    try:
        r = lm_eval.simple_evaluate(model=lm, tasks=tasks[0], task_manager=tasks[1], num_fewshot=args.num_fewshot,
                                    limit=limit, batch_size=args.batch_size, log_samples=False)
    except Exception as e:                             # a task's data or template that lm_eval cannot use
        if args.debug or isinstance(e, MinigptError):
            raise
        why = " ".join(f"{type(e).__name__}: {e}".split())
        raise CLIError(f"--tasks {args.tasks}: lm_eval failed ({why[:300]}); check the task's fields against its "
                       "data (--debug shows where)") from None
    if args.json:
        print(json.dumps({"results": r["results"]}, default=str))
    else:
        print(f"model: {loaded.source}   tasks: {args.tasks}"
              f"{'' if limit is None else f'   limit: {limit}'}")
        print(make_table(r))
    return 0


def main(argv=None) -> int:
    return command_main(EvalArgs, evaluate, argv, __doc__, "minigpt eval")


if __name__ == "__main__":
    sys.exit(main())
