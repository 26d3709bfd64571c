"""minigpt models in lm-evaluation-harness, in-process: `MinigptLM`, registered with lm_eval as "minigpt".

    minigpt eval --model gpt2 --tasks hellaswag --batch-size 16          # the command
    import lm_eval, minigpt.inference.harness                            # the library: importing
    lm_eval.simple_evaluate(model="minigpt", model_args="model=gpt2", tasks=["hellaswag"])   # registers it

Needs the optional extra: pip install "minigpt[eval]" (lm-eval); this module is the only one that
imports lm_eval, and only when asked for. The three request types, batched:
  loglikelihood / loglikelihood_rolling: the token sequences scored exactly in fp32
    (minigpt.inference.scoring.Scorer; adapters and quantized bases included), a context longer
    than the model's is cut from the left as lm_eval's hf backend cuts it, rolling windows as it
    makes them (lm_eval.utils.get_rolling_token_windows);
  generate_until: the requests decoded together by the continuous-batching engine
    (minigpt.inference.engine), greedy unless the task samples, stopped at `until` and at EOS.
Tokens are GPT-2's (tiktoken), as the hf backend's with the GPT-2 tokenizer.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..errors import ConfigError
from .scoring import Scorer

__all__ = ["MinigptLM", "resolve_tasks"]

EOT = "<|endoftext|>"


class MinigptLM(TemplateLM):
    """lm_eval's LM over a minigpt GPT (or any source `minigpt chat` loads: model, adapter, quantize,
    revision). batch_size: sequences per scoring forward and requests decoded together."""

    def __init__(self, model=None, adapter: Optional[str] = None, quantize: Optional[str] = None,
                 revision: Optional[str] = None, batch_size=8, device: Optional[str] = None,
                 max_batch_size: Optional[int] = None, max_gen_toks: int = 256, **kwargs):
        super().__init__()
        from ..data.tokenizer import get_tokenizer

        if model is None or isinstance(model, (str, Path)):
            from ..device import resolve_device
            from ..training.runs import load_chat_model

            model = load_chat_model(None if model is None else str(model), adapter, device=resolve_device(device or
                                    "auto"), quantize=quantize, revision=revision).model
        self.model = model.eval()
        self.scorer = Scorer(model)
        self.tok = get_tokenizer()
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 8   # "auto": 8
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_token

    @property
    def max_length(self) -> int:
        return self.model.context_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tok.encode(string, allowed_special={EOT})

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(list(tokens))

    # --- log-likelihoods -------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether it is the greedy continuation) per request
        ((context, continuation), context ids, continuation ids)."""
        L = self.max_length
        seqs = [(list(ctx) + list(cont))[-(L + 1):] for _, ctx, cont in requests]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list = [None] * len(seqs)
        step = 32 * self.batch_size_per_gpu
        with tqdm(total=len(seqs), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            for s in range(0, len(order), step):
                part = order[s:s + step]
                for i, scored in zip(part, self.scorer.score([seqs[i] for i in part], top=1,
                                                             batch_size=self.batch_size_per_gpu)):
                    n = min(len(requests[i][2]), len(seqs[i]) - 1)
                    conts = seqs[i][len(seqs[i]) - n:]
                    greedy = all(top[0][0] == t for top, t in zip(scored.top[len(scored.top) - n:], conts))
                    out[i] = (float(sum(scored.logprobs[len(scored.logprobs) - n:])), bool(greedy))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
                bar.update(len(part))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over disjoint windows of the model's context."""
        windows, owners = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for w in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + w)
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) continuations, all requests in the engine's batch."""
        from .engine import Engine, Request
        from .sampling import SamplingConfig

        engine = Engine(self.model, self.tok, max_batch=self.batch_size_per_gpu, max_waiting=len(requests)).start()
        done, texts = threading.Semaphore(0), [[] for _ in requests]
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        plans = []
        try:
            for k, req in enumerate(requests):
                context, gen_kwargs = req.args
                kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                until = handle_stop_sequences(kw.pop("until", None), eos=EOT)
                n = int(kw.pop("max_gen_toks"))
                if not 0 < n < self.max_length:
                    raise ConfigError(f"max_gen_toks {n} must be in 1..{self.max_length - 1} (the model's context)")
                ids = self.tok_encode(context)[-(self.max_length - n):] or [self.eot_token_id]
                sampling = SamplingConfig(temperature=float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0,
                                          top_p=kw.get("top_p"), top_k=kw.get("top_k"))

                def on_event(ev, k=k):                                   # (runs in the engine's thread)
                    if ev.kind == "text":
                        texts[k].append(ev.text)
                    elif ev.kind == "error":
                        texts[k] = [None, ev.message]
                    if ev.kind != "text":
                        done.release()
                plans.append(until)
                engine.submit(Request(ids, n, sampling, until, seed=1234, on_event=on_event))
            for _ in requests:
                done.acquire()
                bar.update(1)
        finally:
            engine.stop()
            bar.close()
        out = []
        for (context, gen_kwargs), pieces, until in zip((r.args for r in requests), texts, plans):
            if pieces and pieces[0] is None:
                raise ConfigError(f"generation failed: {pieces[1]}")
            text = postprocess_generated_text("".join(pieces), until, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


try:
    register_model("minigpt")(MinigptLM)
except ValueError:                 # this module imported a second time (a reload): the first class stays
    pass


# --- tasks ----------------------------------------------------------------------------------------

TASK_FIELDS = ("task", "dataset_path", "doc_to_target")


def resolve_tasks(spec: str):
    """(tasks for lm_eval.simple_evaluate, its TaskManager) from a comma-separated list of task names
    and task YAML files; a file without the fields a task needs, an unknown name: ConfigError."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ConfigError("--tasks needs at least one task name or task YAML file")
    tasks, names = [], []
    for item in items:
        if item.endswith((".yaml", ".yml")):
            tasks.append(_task_file(item, load_yaml))
        else:
            tasks.append(item)
            names.append(item)
    manager = TaskManager(include_defaults=bool(names))
    known = set(manager.all_tasks) if names else set()
    unknown = [n for n in names if n not in known and not manager.match_tasks([n])]
    if unknown:
        raise ConfigError(f"--tasks: unknown task {unknown[0]!r} (lm_eval ls tasks lists them; a task file ends "
                          f"in .yaml)")
    return tasks, manager


def _task_file(path: str, load_yaml) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--tasks {path}: no such task file")
    try:
        config = load_yaml(p, resolve_func=True)
    except Exception as e:                                 # YAML syntax, a missing include, ...
        why = " ".join(f"{type(e).__name__}: {e}".split())
        raise ConfigError(f"--tasks {path}: cannot read it ({why[:300]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--tasks {path}: not a task (a YAML mapping with {', '.join(TASK_FIELDS)}, ...)")
    kind = config.get("output_type", "generate_until")
    need = TASK_FIELDS + (("doc_to_choice",) if kind == "multiple_choice" else ()) + \
        (() if kind == "loglikelihood_rolling" else ("doc_to_text",))
    missing = [f for f in need if f not in config]
    if missing:
        raise ConfigError(f"--tasks {path}: missing field{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)} (a {kind} task needs {', '.join(need)})")
    return config
