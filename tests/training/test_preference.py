"""DPO, IPO and ORPO (minigpt.training.preference) against trl on the same model and batch: loss,
rewards, log-probs and gradients; the reference as the base with the adapter switched off; preference
data (minigpt.data.preferences); `finetune --objective` end to end on a tiny base."""
from __future__ import annotations

import functools
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import tiny
import torch

from minigpt.data.preferences import (
    PreferenceDataset,
    collate_pairs,
    collate_shared_pairs,
    load_preferences,
    tokenize_pairs,
)
from minigpt.errors import DataError
from minigpt.methods import adapters_disabled, method_config, plain_state_dict
from minigpt.training.preference import PreferenceLoss, dpo_loss, ipo_loss
from minigpt.weights.keymap import minigpt_to_hf

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

TOL = 1e-5
PAD = 50256


def _pairs(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(0, 50256, (k,), generator=g).tolist()
    return [{"prompt": ids(3 + i), "chosen": ids(2 + 2 * i) + [PAD], "rejected": ids(5 - i) + [PAD]} for i in range(n)]


def _hf(model):
    """A transformers GPT2LMHeadModel with `model`'s weights (fp32, no dropout)."""
    c = model.config
    cfg = transformers.GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
                                  vocab_size=c.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  layer_norm_epsilon=c.layer_norm_epsilon)
    hf = transformers.GPT2LMHeadModel(cfg)
    sd = minigpt_to_hf(plain_state_dict(model) if hasattr(model, "kv_prefix") else model.state_dict())
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k or k == "lm_head.weight" for k in missing)
    hf.tie_weights()
    return hf.eval()


def _trl_dpo(policy_hf, ref_hf, examples, beta, loss_type="sigmoid"):
    """trl's DPOTrainer._compute_loss on the batch (its collator), with a stand-in for the trainer's state."""
    from accelerate import Accelerator

    inputs = DataCollatorForPreference(pad_token_id=PAD)(
        [{"prompt_ids": e["prompt"], "chosen_ids": e["chosen"], "rejected_ids": e["rejected"]} for e in examples])
    for m in (policy_hf, ref_hf):
        if not getattr(m, "_fused", False):
            add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
            m._fused = True
    fake = SimpleNamespace(model=policy_hf, ref_model=ref_hf, accelerator=Accelerator(cpu=True),
                           aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=False,
                           args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                           f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                           label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list),
                                                                               "eval": defaultdict(list)},
                           _total_train_tokens=0, _tp_size=1)
    loss = DPOTrainer._compute_loss(fake, policy_hf, inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["eval" if not policy_hf.training else "train"].items()}


def _ours(policy, reference, examples, objective, beta, shared=False, **kw):
    """Our loss and metric means on the batch: two rows a pair (collate_pairs) or one (collate_shared_pairs)."""
    loss_mod = PreferenceLoss(policy, objective, beta, reference=reference, **kw)
    if shared:
        x, y, t, seg = collate_shared_pairs(examples, PAD)
        loss, m = loss_mod.pair_losses(x, y, t, segments=seg)
    else:
        loss, m = loss_mod.pair_losses(*collate_pairs(examples, PAD))
    return loss, {k: float(v.float().mean()) for k, v in m.items()}


def _grads_hf_names(model) -> dict:
    return minigpt_to_hf({n: p.grad for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("shared", [False, True], ids=["two-rows", "shared-prompt"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_ipo_equal_trl_loss_rewards_and_gradients(loss_type, shared):
    policy, ref = tiny.gpt(n_embd=32, std=0.05, seed=1), tiny.gpt(n_embd=32, std=0.05, seed=2)
    examples, beta = _pairs(), 0.3
    objective = "dpo" if loss_type == "sigmoid" else "ipo"
    policy_hf, ref_hf = _hf(policy), _hf(ref)
    policy.train(), policy_hf.train()          # (no dropout in either: same numbers)
    ours, m = _ours(policy, ref, examples, objective, beta, shared=shared)
    theirs, tm = _trl_dpo(policy_hf, ref_hf, examples, beta, loss_type)
    assert abs(float(ours) - float(theirs)) < TOL
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert abs(m[k] - tm[k]) < TOL * max(1.0, abs(tm[k])), k
    ours.backward()
    theirs.backward()
    mine, hf_grads = _grads_hf_names(policy), dict(policy_hf.named_parameters())
    worst = max(float((g - hf_grads[k].grad).abs().max()) for k, g in mine.items() if k != "lm_head.weight")
    assert worst < TOL


def test_label_smoothing_is_conservative_dpo():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    z = (pc - pr) - (rc - rr)
    want = -torch.nn.functional.logsigmoid(0.1 * z) * 0.8 - torch.nn.functional.logsigmoid(-0.1 * z) * 0.2
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, 0.1, 0.2), want)
    assert torch.allclose(ipo_loss(pc, pr, rc, rr, torch.tensor([2.0]), torch.tensor([4.0]), 0.5),
                          ((pc - rc) / 2 - (pr - rr) / 4 - 1.0) ** 2)


@pytest.mark.parametrize("shared", [False, True], ids=["two-rows", "shared-prompt"])
def test_lora_reference_is_the_base_and_first_step_is_ln2(shared):
    """The adapter switched off is the base: trl on (merged policy, base) = ours on (LoRA model, 'adapters');
    with a fresh adapter (B = 0) the DPO loss is ln 2 and every reward 0."""
    base = tiny.gpt(n_embd=32, std=0.05, seed=3)
    base_hf = _hf(base)
    model = tiny.gpt(n_embd=32, std=0.05, seed=3)
    method_config("lora", r=4, dropout=0.0).apply(model)
    examples = _pairs(1)
    loss, m = _ours(model, "adapters", examples, "dpo", 0.1, shared=shared)
    assert abs(float(loss) - math.log(2)) < 1e-6 and m["rewards/margins"] == 0.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ours, m = _ours(model, "adapters", examples, "dpo", 0.1, shared=shared)
    theirs, tm = _trl_dpo(_hf(model), base_hf, examples, 0.1)
    assert abs(float(ours) - float(theirs)) < TOL and abs(m["rewards/margins"] - tm["rewards/margins"]) < TOL


@pytest.mark.parametrize("method", ["ia3", "prefix", "adapter"])
def test_adapters_disabled_gives_the_base(method):
    base = tiny.gpt(n_embd=32, std=0.05, seed=4)
    model = tiny.gpt(n_embd=32, std=0.05, seed=4)
    method_config(method).apply(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(0, 50256, (2, 7))
    assert not torch.allclose(model(x), base(x))
    with adapters_disabled(model):
        assert torch.allclose(model(x), base(x), atol=1e-6)
    assert not torch.allclose(model(x), base(x))


def _trl_orpo(policy_hf, examples, beta):
    from accelerate import Accelerator
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    def side(key):
        seqs = [e["prompt"] + e[key] for e in examples]
        T = max(map(len, seqs))
        ids = torch.tensor([s + [PAD] * (T - len(s)) for s in seqs])
        att = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        lab = torch.tensor([[-100] * len(e["prompt"]) + e[key] + [-100] * (T - len(s)) for e, s in zip(examples, seqs)])
        return {f"{key}_input_ids": ids, f"{key}_attention_mask": att, f"{key}_labels": lab}

    fake = SimpleNamespace(is_encoder_decoder=False, padding_value=PAD, accelerator=Accelerator(cpu=True),
                           aux_loss_enabled=False, beta=beta, concatenated_inputs=ORPOTrainer.concatenated_inputs,
                           get_batch_logps=ORPOTrainer.get_batch_logps)
    fake.concatenated_forward = functools.partial(ORPOTrainer.concatenated_forward, fake)
    fake.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, fake)
    return ORPOTrainer.get_batch_loss_metrics(fake, policy_hf, {**side("chosen"), **side("rejected")})


@pytest.mark.parametrize("shared", [False, True], ids=["two-rows", "shared-prompt"])
def test_orpo_equals_trl(shared):
    policy = tiny.gpt(n_embd=32, std=0.05, seed=5)
    policy_hf = _hf(policy)
    examples = _pairs(2)
    ours, m = _ours(policy, None, examples, "orpo", 0.25, shared=shared)
    theirs, tm = _trl_orpo(policy_hf, examples, 0.25)
    assert abs(float(ours) - float(theirs)) < TOL
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "nll_loss", "log_odds_chosen", "log_odds_ratio"):
        assert abs(m[k] - tm[k]) < TOL * max(1.0, abs(tm[k])), k
    ours.backward()
    theirs.backward()
    mine, hf_grads = _grads_hf_names(policy), dict(policy_hf.named_parameters())
    assert max(float((g - hf_grads[k].grad).abs().max()) for k, g in mine.items() if k != "lm_head.weight") < TOL


def test_padding_and_batching_do_not_change_logps():
    """A pair's numbers are the same alone or in a padded batch."""
    policy, ref = tiny.gpt(n_embd=32, std=0.05, seed=6), tiny.gpt(n_embd=32, std=0.05, seed=7)
    examples = _pairs(3, n=4)
    _, together = PreferenceLoss(policy, "dpo", 0.1, reference=ref).pair_losses(*collate_pairs(examples))
    for i, e in enumerate(examples):
        _, alone = PreferenceLoss(policy, "dpo", 0.1, reference=ref).pair_losses(*collate_pairs([e]))
        assert abs(float(alone["rewards/chosen"][0]) - float(together["rewards/chosen"][i])) < TOL


# --- data --------------------------------------------------------------------------------------------

def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_preference_shapes_and_bad_rows(tmp_path):
    conv = lambda a: [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": a}]  # noqa: E731
    p = _write(tmp_path, "prefs.jsonl", [
        {"prompt": "Say hi", "chosen": " hi", "rejected": " go away"},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q"}],
         "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": conv("yes"), "rejected": conv("no")},
        {"conversation_a": conv("A"), "conversation_b": conv("B"), "winner": "model_b"},
        {"conversation_a": conv("A"), "conversation_b": conv("B"), "winner": "tie"},
        {"prompt": "same", "chosen": "x", "rejected": "x"},
    ])
    pairs, stats = load_preferences(p)
    assert stats == {"ties": 1, "identical": 1} and len(pairs) == 4
    assert pairs[1]["system"] == "Be kind." and pairs[1]["chosen"] == "good"
    assert (pairs[2]["chosen"], pairs[2]["rejected"]) == ("yes", "no")
    assert (pairs[3]["chosen"], pairs[3]["rejected"]) == ("B", "A")
    bad = _write(tmp_path, "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                         {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'rejected'"):
        load_preferences(bad)
    sft = _write(tmp_path, "sft.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"sft\.jsonl:1: expected preference records: 'prompt' with 'chosen'"):
        load_preferences(sft)


def test_tokenisation_keeps_the_boundary_and_eos():
    from minigpt.data.templates import get_template
    from minigpt.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    pair = {"messages": [{"role": "user", "content": "The cat"}], "system": None, "chosen": "s sat", "rejected": "x"}
    (ex,), _ = tokenize_pairs([pair], tok, "none", 64)
    assert ex["prompt"] == tok.encode_ordinary("The cat") and ex["chosen"] == tok.encode_ordinary("s sat") + [PAD]
    (ex,), _ = tokenize_pairs([pair], tok, "alpaca", 64)
    assert ex["prompt"] == get_template("alpaca").prompt_ids(pair["messages"], tok)
    ds = PreferenceDataset([ex, ex, ex], batch_size=2, grad_accum=2)
    x, y, n, kw = ds.batch(0, 1)
    assert x.shape[0] == 2 and (y[0] != -100).sum() == len(ex["chosen"])


# --- the command ---------------------------------------------------------------------------------------

@pytest.fixture
def tiny_base(tmp_path):
    d = tmp_path / "base"
    tiny.gpt(block_size=96).save_pretrained(d)
    return d


@pytest.fixture
def prefs(tmp_path):
    rows = [{"prompt": f"Name a colour number {i}.", "chosen": ["red", "blue", "green"][i % 3],
             "rejected": "I don't know."} for i in range(12)]
    return _write(tmp_path, "prefs.jsonl", rows)


def _run(tmp_path, base, data, *extra):
    from minigpt.commands.args import parse_args
    from minigpt.commands.finetune import FinetuneArgs, finetune

    argv = ["--base", str(base), "--data", str(data), "--out-dir", str(tmp_path / "out"), "--max-steps", "2",
            "--batch-size", "2", "--grad-accum", "2", "--samples", "0", "--exact-match", "0", "--threads", "1",
            "--eval-interval", "2", "--log-interval", "1", "--device", "cpu", "--precision", "fp32", *extra]
    return finetune(parse_args(FinetuneArgs, argv))


@pytest.mark.parametrize("objective,method", [("dpo", "lora"), ("ipo", None), ("orpo", "ia3")])
def test_finetune_objectives_log_trl_metrics(tmp_path, tiny_base, prefs, objective, method):
    _run(tmp_path, tiny_base, prefs, "--objective", objective, *(["--method", method] if method else []))
    recs = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert all(k in train[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"))
    assert any("val_rewards/margins" in r for r in recs)
    if objective == "dpo":
        assert abs(train[0]["loss"] - math.log(2)) < 1e-5      # policy = reference at the first step


def test_finetune_bad_flags(tmp_path, tiny_base, prefs, capsys):
    for extra, msg in [(("--objective", "dpo", "--beta", "0"), "--beta must be > 0"),
                       (("--objective", "ipo", "--beta", "-1"), "--beta must be > 0"),
                       (("--objective", "orpo", "--ref-model", str(tiny_base)), "ORPO needs no reference"),
                       (("--objective", "ipo", "--label-smoothing", "0.1"), "--label-smoothing applies to"),
                       (("--beta", "0.2",), "--beta applies to --objective dpo, ipo or orpo")]:
        with pytest.raises(SystemExit):
            _run(tmp_path, tiny_base, prefs, *extra)
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_finetune_dpo_on_sft_data_names_the_fields(tmp_path, tiny_base):
    sft = _write(tmp_path, "sft.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    with pytest.raises(DataError, match="expected preference records: 'prompt' with 'chosen' and 'rejected'"):
        _run(tmp_path, tiny_base, sft, "--objective", "dpo")


def test_sft_refuses_preference_data_pointing_to_dpo(tmp_path, tiny_base, prefs):
    with pytest.raises(DataError, match="--objective dpo"):
        _run(tmp_path, tiny_base, prefs)
