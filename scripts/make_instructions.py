"""Generate minigpt/assets/instructions.jsonl, minigpt's embedded instruction-tuning set.

Everything here is written for minigpt (no published dataset is copied): support questions and
answers about using minigpt, plus synthetic tasks with exactly checkable answers (small-number
arithmetic, reversing, case changes, counting, sorting, list/JSON formatting, ...) and a few
multi-turn chats. Deterministic (seeded): rerunning reproduces the file byte for byte.

    python scripts/make_instructions.py            # writes minigpt/assets/instructions.jsonl

Each line is an Alpaca record {"instruction", "input", "output"} or a chat record {"messages"},
with "task" (category), "exact" (answer checkable by exact match) and "split" ("train"/"val").
About 10% of each category is marked "val", chosen by the seeded RNG.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240607
OUT = Path(__file__).resolve().parent.parent / "minigpt" / "assets" / "instructions.jsonl"

# --------------------------------------------------------------------------------------------
# Support Q&A about minigpt. Each entry: (list of phrasings of the question, answer).
# --------------------------------------------------------------------------------------------
SUPPORT = [
    (["How do I train a model with minigpt?", "What is the quickest way to start training?",
      "How can I pretrain a small GPT from scratch?"],
     "Run `python train.py`. With no arguments it trains a small GPT-2-style model on the Shakespeare "
     "text that ships with minigpt and writes checkpoints to `out/`. Use `--data` to train on your own "
     "text and `--out-dir` to choose where the results go."),
    (["How do I train on my own text file?", "Can I pretrain on my own corpus?"],
     "Pass the file with `--data`, for example `python train.py --data my.txt --out-dir out-my`. "
     "`--data` accepts a UTF-8 text file, a folder of .txt files, or a .bin file of uint16 GPT-2 token ids."),
    (["How do I resume an interrupted training run?", "My training stopped halfway. Can I continue it?"],
     "Run the same command again with `--resume`, for example `python train.py --out-dir out-my --resume`. "
     "minigpt picks up the newest checkpoint in `--out-dir`, including the optimizer state and the data "
     "position, and continues from there."),
    (["How do I train a model with the GPT-2 small shape?", "Can I train a 124M parameter model?"],
     "Use `--model gpt2`: `python train.py --model gpt2 --data my.txt`. That builds the GPT-2 small shape "
     "(12 layers, 12 heads, 768 wide) with fresh weights. It is meant for a GPU; on a CPU start with the "
     "small default model."),
    (["How do I continue pretraining from the released GPT-2 weights?",
      "Can I start training from existing weights instead of random ones?"],
     "Use `--init-from`, for example `python train.py --init-from gpt2 --data my.txt`. It accepts anything "
     "`GPT.from_pretrained` accepts: a preset name, a Hugging Face GPT-2 folder, an OpenAI TensorFlow "
     "checkpoint folder or a folder saved by minigpt."),
    (["How do I fine-tune GPT-2 on instructions?", "How can I instruction-tune a model?",
      "What is the command for LoRA fine-tuning?"],
     "Run `python finetune.py --lora --base gpt2 --out-dir out-lora`. Without `--data` it uses the "
     "instruction set embedded in minigpt; pass `--data my_data.jsonl` to use your own. With `--lora` only "
     "the small adapter matrices are trained and the result is saved as an adapter in `--out-dir`."),
    (["What does the --lora flag do?", "Why would I use --lora when fine-tuning?"],
     "`--lora` freezes the base model and trains low-rank adapter matrices (LoRA) instead. For GPT-2 small "
     "with rank 8 on the attention projection that is 294,912 trainable parameters instead of about "
     "124 million, so fine-tuning needs far less memory and the saved adapter is only about a megabyte."),
    (["Which LoRA settings can I change?", "How do I set the LoRA rank and alpha?"],
     "finetune.py takes `--lora-r` (rank, default 8), `--lora-alpha` (default 16), `--lora-dropout` "
     "(default 0.05) and `--lora-targets` (default c_attn). The update is scaled by alpha / r."),
    (["Which layers can LoRA be applied to?", "What are valid LoRA targets?"],
     "Targets are matched by the end of the module name: `c_attn` (the fused query/key/value projection), "
     "`c_proj` (both attention and MLP output projections), `attn.c_proj`, `mlp.c_proj`, `c_fc` and "
     "`lm_head`. You can also name `q`, `k` or `v` to adapt only those parts of c_attn."),
    (["What is rsLoRA?", "What does use_rslora change?"],
     "rsLoRA (rank-stabilised LoRA) scales the update by alpha / sqrt(r) instead of alpha / r, which keeps "
     "the update's size more stable when you use a larger rank. In Python pass `use_rslora=True` to `add_lora`."),
    (["How do I chat with a model?", "How can I talk to my fine-tuned model?"],
     "Run `python chat.py --model gpt2 --adapter out-lora`. `--model` names the base model and `--adapter` "
     "the LoRA adapter folder written by finetune.py. Leave out `--adapter` to chat with the base model."),
    (["How do I chat with a fully fine-tuned or merged model?", "Can chat.py load a model folder directly?"],
     "Yes. Point `--model` at the folder: `python chat.py --model out-merged`. Any folder that "
     "`GPT.from_pretrained` reads works, including folders written by `save_pretrained`."),
    (["How do I load a checkpoint in Python?", "How do I load GPT-2 weights in code?"],
     "Use `GPT.from_pretrained(src)`: `from minigpt import GPT` then `model = GPT.from_pretrained(\"gpt2\")`. "
     "`src` can be a preset name, a Hugging Face GPT-2 folder, an OpenAI TensorFlow checkpoint folder or a "
     "folder written by `save_pretrained` or by training."),
    (["How do I save a model?", "How can I export my model for transformers?"],
     "Call `model.save_pretrained(\"my-model\")`. It writes `config.json` and `model.safetensors`, and "
     "`transformers.GPT2LMHeadModel.from_pretrained(\"my-model\")` loads them with the same outputs."),
    (["Can minigpt read the original OpenAI GPT-2 checkpoints?", "Do I need TensorFlow to load the OpenAI files?"],
     "minigpt reads OpenAI TensorFlow checkpoint folders (hparams.json plus model.ckpt.index and "
     "model.ckpt.data-00000-of-00001) without TensorFlow. Pass the folder to `GPT.from_pretrained`."),
    (["What happens if I load gpt2 while offline?", "Why does from_pretrained fail without internet?"],
     "Preset names such as \"gpt2\" are loaded from the local cache. The weights are downloaded once when "
     "you are online; if you are offline and they are not cached yet, minigpt stops with a clear error. "
     "Download them once while online, or pass a local folder instead."),
    (["How do I add LoRA to a model in Python?", "What is the Python API for LoRA?"],
     "`from minigpt import add_lora` and call `add_lora(model, r=8, alpha=16, dropout=0.05, "
     "targets=(\"c_attn\",))`. It wraps the matching layers, freezes everything else and returns the model."),
    (["How many parameters does LoRA train on GPT-2 small?", "How many trainable parameters with r=8 on c_attn?"],
     "With r=8 on c_attn, each of the 12 layers adds an 8 x 768 matrix A and a 2304 x 8 matrix B, which is "
     "24,576 parameters per layer and 294,912 in total. The base model's 124,439,808 parameters stay frozen."),
    (["How do I merge a LoRA adapter into the model?", "What does merge_lora do?"],
     "`merge_lora(model)` adds the LoRA update (B times A times the scaling) into each base weight, so the "
     "model runs without the extra matrices. `unmerge_lora(model)` subtracts it again. To get a plain model "
     "that saves as ordinary GPT-2, use `remove_lora(model, merge=True)` and then `save_pretrained`."),
    (["How do I save only the adapter?", "What files does save_adapter write?"],
     "`save_adapter(model, dir)` writes `adapter_config.json` and `adapter_model.safetensors` in the PEFT "
     "layout. Only the LoRA matrices are saved, so the folder is small."),
    (["Can I use a minigpt adapter with the peft library?", "Are minigpt adapters compatible with PEFT?"],
     "Yes. The adapter folder uses PEFT's file names and keys, so `peft.PeftModel.from_pretrained(gpt2, dir)` "
     "on a transformers GPT-2 with the same base weights gives the same outputs. `load_adapter` also reads "
     "adapters written by PEFT."),
    (["How do I load an adapter in Python?", "What does load_adapter do?"],
     "`load_adapter(model, dir)` reads the adapter folder. On a plain model it first adds the LoRA layers "
     "that the adapter's config names, then copies the weights. If the adapter was made for a model of a "
     "different size it stops with an error naming the mismatched tensor and both shapes."),
    (["What data formats does finetune.py accept?", "What should my fine-tuning data look like?"],
     "Three formats: Alpaca-style JSON or JSONL with `instruction`, `input` and `output` fields; chat JSONL "
     "where each line has `messages`, a list of {role, content} with roles system, user and assistant; and "
     "plain text with `### Human:` and `### Assistant:` turns."),
    (["How do I separate conversations in the plain text format?", "How does the ### Human: format work?"],
     "Each turn starts with `### Human:` or `### Assistant:`. Turns that follow each other directly belong to "
     "one conversation; an empty line followed by a new `### Human:` line starts the next conversation."),
    (["What prompt template does fine-tuning use?", "What does the default prompt look like?"],
     "The default is the Alpaca template: `### Instruction:` with the instruction, an `### Input:` section "
     "only when the input is not empty, and `### Response:` followed by the answer. The answer is followed "
     "by the end-of-text token so the model learns where to stop."),
    (["Does fine-tuning train on the prompt too?", "What does prompt masking mean?"],
     "By default no: prompt tokens get the label -100 and are ignored by the loss, so only the responses "
     "and their end-of-text token are learned. Pass `--no-mask-prompt` to train on the prompt as well."),
    (["What does the error 'sequence exceeds the context length' mean?",
      "Why do I get an error about the context length?"],
     "The input is longer than the model's context (1024 tokens for GPT-2). Use a shorter prompt or lower "
     "the maximum length of your examples; long fine-tuning examples are truncated at the end."),
    (["I get CUDA out of memory. What can I do?", "Training runs out of GPU memory. How do I fix it?"],
     "Lower `--batch-size` and raise `--grad-accum` to keep the same effective batch, use "
     "`--precision bf16` on GPUs that support it, shorten the context, or fine-tune with `--lora`."),
    (["My data file gives an error with a line number. What does it mean?",
      "What is a DataError?"],
     "minigpt checks every record while reading. The message names the file and the line, for example "
     "`data.jsonl:12: missing field 'output'`. Fix that line (broken JSON, a missing field, a wrong type or "
     "an unknown role) and run again."),
    (["Which tokenizer does minigpt use?", "Does the tokenizer need the internet?"],
     "minigpt uses GPT-2's byte-pair encoding through tiktoken, built from a vocabulary file that ships with "
     "the package, so it works offline. Get it with `minigpt.get_tokenizer()`; the end-of-text token is 50256."),
    (["What is the end-of-text token id?", "Which token ends a response?"],
     "It is 50256, `<|endoftext|>`. Fine-tuning appends it after every response, and chat stops generating "
     "when the model produces it."),
    (["How do I generate text in Python?", "How do I sample from a model in code?"],
     "Encode a prompt, then call `model.generate(idx, max_new_tokens=64, temperature=0.0)` with `idx` a "
     "(1, T) tensor of token ids. Temperature 0 means greedy decoding; `top_k`, `top_p` and "
     "`repetition_penalty` control sampling."),
    (["What does temperature do?", "Should I use temperature 0?"],
     "Temperature scales the logits before sampling. 0 means greedy: always the most likely token, which is "
     "repeatable and good for exact answers. Values around 0.7 to 1.0 give more varied text."),
    (["Which model sizes are available?", "What presets does GPTConfig.from_name know?"],
     "gpt2 (12 layers, 12 heads, 768 wide, 124M parameters), gpt2-medium (24, 16, 1024, 355M), "
     "gpt2-large (36, 20, 1280, 774M) and gpt2-xl (48, 25, 1600, 1.5B). All use a 1024-token context."),
    (["How do I train on a GPU?", "How do I pick the device?"],
     "Pass `--device cuda` (or `cuda:1` for a second GPU); the default `--device auto` uses a GPU when one "
     "is available. `--precision auto` then uses bf16 or fp16 on the GPU and fp32 on the CPU."),
    (["Can I train on several GPUs?", "Does minigpt support data parallel training?"],
     "Yes, launch train.py with torchrun, for example `torchrun --nproc_per_node 4 train.py --model gpt2`. "
     "Each process trains on its own share of the batches."),
    (["Where are checkpoints written?", "What is in the output folder?"],
     "Everything goes to `--out-dir` (default `out` for train.py, `out-finetune` for finetune.py): the "
     "checkpoints, a metrics log and the final model. "
     "For LoRA runs the final adapter is saved there as adapter_config.json and adapter_model.safetensors."),
    (["How do I use my own instruction data?", "Can I fine-tune on my own JSONL file?"],
     "Yes: `python finetune.py --lora --base gpt2 --data my_data.jsonl --out-dir out-mine`. Each line "
     "needs either `instruction`/`output` (and optionally `input`) or a `messages` list."),
    (["How do I stop chat.py?", "How do I leave the chat?"],
     "Press Ctrl-D, or Ctrl-C while nothing is being generated. Ctrl-C during an answer stops that answer."),
    (["Is the lm_head a separate weight in minigpt?", "Are the input and output embeddings tied?"],
     "They are tied, as in GPT-2: `lm_head.weight` is the same tensor as `transformer.wte.weight`. LoRA on "
     "lm_head keeps the tie and only changes the output side, so such an adapter is kept separate rather "
     "than merged."),
    (["Why does my fine-tuned model keep talking after the answer?", "The model does not stop after answering."],
     "The model learns to stop from the end-of-text token appended to each response. Train a little longer, "
     "check that your data's responses are not truncated, and make sure chat uses the same prompt template "
     "as fine-tuning."),
    (["Can I fine-tune all weights instead of LoRA?", "How do I do a full fine-tune?"],
     "Leave out `--lora`: `python finetune.py --base gpt2 --data my_data.jsonl`. All weights are then "
     "trained, which needs much more memory, and the result is saved as a full model folder."),
    (["What learning rate should I use for LoRA?", "Which learning rate works for fine-tuning?"],
     "LoRA usually tolerates a higher learning rate than full fine-tuning; something around 1e-4 to 3e-4 is "
     "a reasonable start. Set it with `--lr` and watch the validation loss."),
    (["How does minigpt hold out validation data for fine-tuning?", "Which examples are used for evaluation?"],
     "Records with `\"split\": \"val\"` are held out. If a dataset has no split field, a fixed 10% is chosen "
     "with a seeded random generator, so the split is the same every run."),
    (["Does minigpt depend on transformers?", "Do I need peft installed?"],
     "No. minigpt is pure PyTorch with tiktoken and safetensors. transformers and peft are only used by the "
     "tests to check that minigpt's models and adapters match theirs."),
    (["What is gradient checkpointing and how do I turn it on?", "How can I save activation memory?"],
     "Gradient checkpointing recomputes each block's activations during the backward pass instead of "
     "storing them, trading compute for memory. Pass `--gradient-checkpointing` to finetune.py, or in Python set "
     "`model.gradient_checkpointing = True` before training."),
    (["What is LoRA?", "Explain LoRA briefly."],
     "LoRA keeps a weight W frozen and learns a low-rank update: the layer computes W x plus B A x times "
     "alpha / r, where A has r rows and B has r columns. B starts at zero, so training starts from the "
     "unchanged model."),
    (["How are LoRA matrices initialised?", "Why does a fresh adapter not change the output?"],
     "A gets a Kaiming-uniform initialisation and B starts at zero. Since B is zero, B A is zero and a fresh "
     "adapter leaves the model's outputs unchanged."),
    (["What is minigpt?", "What can minigpt do?"],
     "minigpt is a small GPT-2 library in pure PyTorch: you can pretrain with `python train.py`, "
     "instruction-tune with `python finetune.py --lora`, and chat with `python chat.py`. It loads GPT-2 "
     "weights and saves files that transformers and peft can read."),
    (["How do I check what a fine-tuned model learned?", "How is exact-match accuracy measured?"],
     "For tasks with one correct answer, such as arithmetic, the evaluation generates a greedy answer for "
     "each held-out prompt and compares it with the expected answer after stripping whitespace."),
    (["Can I use a system prompt?", "Does the chat format support system messages?"],
     "Yes. In chat JSONL put a message with role `system` first; in Alpaca records add a `system` field. "
     "The template places it before the first turn."),
    (["Which prompt templates exist?", "Can I change the prompt format?"],
     "There are three: `alpaca` (the default), `human-assistant` with `### Human:` / `### Assistant:` turns, "
     "and `chat` with `<|system|>`, `<|user|>` and `<|assistant|>` tags. Use the same template for "
     "fine-tuning and chat."),
    (["What does unmerge_lora do?", "Can I undo a merge?"],
     "`unmerge_lora(model)` subtracts the LoRA update that `merge_lora` added, so the base weights return to "
     "their previous values up to floating-point rounding and the adapter can be trained or saved again."),
    (["Why is my adapter rejected with a shape mismatch?", "load_adapter says the shapes do not match."],
     "The adapter was trained on a model of a different size, for example gpt2-medium instead of gpt2. Load "
     "it into the base model it was made for; the error names the tensor and both shapes."),
]

# --------------------------------------------------------------------------------------------
# Word lists for synthetic tasks (plain English words, chosen for this file).
# --------------------------------------------------------------------------------------------
WORDS = """apple river garden window pencil candle rocket marble forest silver planet bridge
lantern basket pepper guitar island meadow puzzle rabbit shadow spider ticket violet wallet
yellow anchor button carpet dragon engine falcon harbor jacket kettle ladder magnet napkin
orange parrot quartz ribbon saddle tomato umbrella velvet walnut zipper cactus dolphin
feather giraffe helmet igloo jungle kitten lemon mirror noodle oyster pillow rocket salmon
turtle violin wizard cherry honey summer winter autumn spring cloud thunder pebble""".split()
WORDS = sorted(set(WORDS))

SENTENCES = [
    "the cat sat on the mat", "we walked to the river", "my tea is getting cold",
    "bright stars fill the sky", "she reads books every night", "the train leaves at noon",
    "small steps make big changes", "the garden needs more water", "he painted the door blue",
    "birds sing in the morning", "the old clock stopped ticking", "please close the window",
    "our team won the final game", "fresh bread smells wonderful", "the road bends to the left",
    "snow covered the quiet village", "a fox ran across the field", "the lamp lights the desk",
    "they built a boat from wood", "rain taps on the roof", "the kettle is boiling now",
    "learning takes time and patience", "the map shows three paths", "a red kite flew very high",
]

NAMES = ["Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kemi", "Lars", "Mona", "Nico", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara"]
CITIES = ["Lisbon", "Oslo", "Lima", "Cairo", "Hanoi", "Perth", "Quito", "Tunis", "Zagreb", "Accra"]


def rec(instruction, output, task, inp="", exact=True):
    return {"instruction": instruction, "input": inp, "output": output, "task": task, "exact": exact}


def arithmetic(rng):
    out = []
    add_forms = ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.",
                 "What is the sum of {a} and {b}?", "Calculate {a} + {b}. Answer with the number only."]
    sub_forms = ["What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} minus {b}.",
                 "What is {a} take away {b}?", "Calculate {a} - {b}. Answer with the number only."]
    mul_forms = ["What is {a} * {b}?", "Multiply {a} by {b}.", "What is {a} times {b}?",
                 "Compute the product of {a} and {b}."]
    for _ in range(45):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(rec(rng.choice(add_forms).format(a=a, b=b), str(a + b), "add"))
    for _ in range(40):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if rng.random() < 0.8 and b > a:
            a, b = b, a
        out.append(rec(rng.choice(sub_forms).format(a=a, b=b), str(a - b), "sub"))
    for _ in range(25):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append(rec(rng.choice(mul_forms).format(a=a, b=b), str(a * b), "mul"))
    for _ in range(12):
        a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)
        out.append(rec(f"What is {a} + {b} + {c}?", str(a + b + c), "add3"))
    return out


def text_tasks(rng):
    out = []
    for _ in range(28):
        w = rng.choice(WORDS)
        form = rng.choice(["Reverse the word '{w}'.", "Spell '{w}' backwards.",
                           "Write the letters of '{w}' in reverse order."])
        out.append(rec(form.format(w=w), w[::-1], "reverse_word"))
    for _ in range(20):
        s = rng.choice(SENTENCES)
        out.append(rec("Reverse the order of the words in this sentence.", " ".join(s.split()[::-1]),
                       "reverse_words", inp=s))
    for _ in range(18):
        s = rng.choice(SENTENCES)
        out.append(rec(rng.choice(["Convert the text to uppercase.", "Rewrite this in capital letters."]),
                       s.upper(), "upper", inp=s))
    for _ in range(15):
        s = rng.choice(SENTENCES).upper()
        out.append(rec(rng.choice(["Convert the text to lowercase.", "Rewrite this in small letters."]),
                       s.lower(), "lower", inp=s))
    for _ in range(12):
        s = rng.choice(SENTENCES)
        out.append(rec("Capitalize the first letter of every word.", s.title(), "title", inp=s))
    for _ in range(28):
        w = rng.choice(WORDS)
        letter = rng.choice(sorted(set(w)) if rng.random() < 0.85 else "xzq")
        out.append(rec(f"How many times does the letter '{letter}' appear in '{w}'?", str(w.count(letter)),
                       "count_letter"))
    for _ in range(20):
        s = rng.choice(SENTENCES)
        out.append(rec("How many words are in this sentence?", str(len(s.split())), "count_words", inp=s))
    for _ in range(15):
        w = rng.choice(WORDS)
        out.append(rec(f"How many letters are in the word '{w}'?", str(len(w)), "word_length"))
    for _ in range(12):
        w = rng.choice(WORDS)
        which = rng.choice(["first", "last"])
        out.append(rec(f"What is the {which} letter of '{w}'?", w[0] if which == "first" else w[-1],
                       "first_last_letter"))
    return out


def list_tasks(rng):
    out = []
    for _ in range(22):
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        desc = rng.random() < 0.35
        instr = ("Sort these numbers from largest to smallest." if desc
                 else "Sort these numbers from smallest to largest.")
        out.append(rec(instr, ", ".join(map(str, sorted(nums, reverse=desc))), "sort_numbers",
                       inp=", ".join(map(str, nums))))
    for _ in range(18):
        ws = rng.sample(WORDS, rng.randint(3, 5))
        out.append(rec("Sort these words alphabetically.", ", ".join(sorted(ws)), "sort_words",
                       inp=", ".join(ws)))
    for _ in range(18):
        nums = rng.sample(range(1, 100), rng.randint(3, 7))
        big = rng.random() < 0.5
        out.append(rec("What is the largest number in the list?" if big else
                       "What is the smallest number in the list?",
                       str(max(nums) if big else min(nums)), "max_min", inp=", ".join(map(str, nums))))
    for _ in range(20):
        items = rng.sample(WORDS, rng.randint(2, 5))
        out.append(rec("Format these items as a bulleted list.", "\n".join(f"- {x}" for x in items),
                       "bullets", inp=", ".join(items)))
    for _ in range(12):
        items = rng.sample(WORDS, rng.randint(2, 4))
        out.append(rec("Turn these items into a numbered list.",
                       "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1)), "numbered", inp=", ".join(items)))
    for _ in range(20):
        name, age, city = rng.choice(NAMES), rng.randint(18, 80), rng.choice(CITIES)
        if rng.random() < 0.5:
            out.append(rec("Format this as a JSON object with the keys name and age.",
                           json.dumps({"name": name, "age": age}), "json", inp=f"name: {name}, age: {age}"))
        else:
            out.append(rec("Format this as a JSON object with the keys name and city.",
                           json.dumps({"name": name, "city": city}), "json", inp=f"{name} lives in {city}."))
    for _ in range(10):
        items = rng.sample(WORDS, rng.randint(2, 4))
        out.append(rec("Write these words as a JSON list.", json.dumps(items), "json_list", inp=" ".join(items)))
    return out


def number_tasks(rng):
    out = []
    for _ in range(16):
        n = rng.randint(0, 200)
        out.append(rec(f"Is {n} even or odd? Answer with one word.", "even" if n % 2 == 0 else "odd", "parity"))
    for _ in range(14):
        a, b = rng.sample(range(0, 500), 2)
        out.append(rec(f"Which is larger, {a} or {b}?", str(max(a, b)), "compare"))
    for _ in range(10):
        n = rng.randint(1, 60)
        out.append(rec(f"What number comes after {n}?", str(n + 1), "successor"))
    for _ in range(10):
        n = rng.randint(2, 60)
        out.append(rec(f"What is double {n}?", str(2 * n), "double"))
    return out


def support(rng):
    out = []
    for questions, answer in SUPPORT:
        for q in questions:
            out.append(rec(q, answer, "support", exact=False))
    return out


def chats(rng):
    """A few multi-turn chats (chat JSONL records)."""
    out = []
    for _ in range(12):
        a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(1, 20)
        out.append({"messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": f"Now add {c} to that."},
            {"role": "assistant", "content": str(a + b + c)},
        ], "task": "chat_add", "exact": True})
    for _ in range(8):
        w = rng.choice(WORDS)
        out.append({"messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": f"Reverse the word '{w}'."},
            {"role": "assistant", "content": w[::-1]},
            {"role": "user", "content": "And in uppercase?"},
            {"role": "assistant", "content": w[::-1].upper()},
        ], "task": "chat_reverse", "exact": True})
    def ans(question):
        return next(a for qs, a in SUPPORT if question in qs)
    pairs = [
        ("How do I fine-tune GPT-2 on instructions?", "How do I chat with a model?",
         "And then how do I chat with the result?"),
        ("How do I train a model with minigpt?", "How do I resume an interrupted training run?",
         "It stopped halfway. How do I continue?"),
        ("How do I add LoRA to a model in Python?", "How do I save only the adapter?",
         "How do I save only the adapter?"),
        ("How do I merge a LoRA adapter into the model?", "Can I undo a merge?", "Can I undo that?"),
    ]
    pairs = [(q1, ans(q1), q2, ans(k2)) for q1, k2, q2 in pairs]
    for q1, a1, q2, a2 in pairs:
        out.append({"messages": [
            {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
            {"role": "user", "content": q2}, {"role": "assistant", "content": a2},
        ], "task": "chat_support", "exact": False})
    return out


def build() -> list[dict]:
    rng = random.Random(SEED)
    groups = [support(rng), arithmetic(rng), text_tasks(rng), list_tasks(rng), number_tasks(rng), chats(rng)]
    records = []
    seen = set()
    for g in groups:
        # drop exact repeats (same prompt) so no validation prompt also appears in training
        uniq = []
        for r in g:
            key = json.dumps(r.get("messages") or [r["instruction"], r["input"]])
            if key not in seen:
                seen.add(key)
                uniq.append(r)
        g = uniq
        # ~10% of every group goes to the validation split
        val = set(rng.sample(range(len(g)), max(1, round(len(g) * 0.1))))
        for i, r in enumerate(g):
            r["split"] = "val" if i in val else "train"
            records.append(r)
    rng.shuffle(records)
    return records


def main() -> None:
    records = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    n_val = sum(r["split"] == "val" for r in records)
    print(f"wrote {len(records)} records ({n_val} val) to {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
