"""Chat with a GPT-2 model: multi-turn, streamed token by token. With no arguments it talks to the
newest fine-tuned model (out-finetune/), else the newest pretrained one (out/).

examples:
  minigpt chat                                        # newest local run
  minigpt chat --model gpt2 --template human-assistant
  minigpt chat --model gpt2 --adapter out-finetune    # base + adapter (any method; ours or PEFT's)
  minigpt chat --prompt "Name three colors." --temperature 0
  printf 'hi\\n/set temperature 0\\nand again?\\n' | minigpt chat   # one turn per line
(`python chat.py ...` is the same command.)

In the chat: /help, /reset, /system TEXT, /set NAME VALUE, /show, /save FILE, /quit (or Ctrl-D).
Ctrl-C stops the reply being written and keeps the chat going; the partial reply stays in the
history (marked interrupted in saved transcripts), an empty one is dropped with its question.
When stdin is not a terminal every input line is one user turn (commands work too) and stdout
gets only the replies, one per turn; notices and errors go to stderr.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from ..data.templates import TEMPLATE_NAMES
from ..errors import ChatError
from ..model.quant import QUANT_MODES
from .args import CLIError, command_main, field

HELP = """commands:
  /help                 this help
  /reset                forget the conversation (settings and system prompt stay)
  /system TEXT          set the system prompt (/system alone clears it)
  /set NAME VALUE       temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed
                        (top_k/top_p/seed accept 'none'); /set alone shows the settings
  /show                 settings, template, system prompt, turns
  /save FILE            write the transcript (settings, system, turns) as JSON
  /quit                 leave (also /exit or Ctrl-D)
Ctrl-C interrupts a reply (the partial reply is kept). Start a message with // to send a
literal leading /."""


@dataclass
class ChatArgs:
    model: Optional[str] = field(None, "any GPT.from_pretrained source (Hub name ORG/NAME, preset, HF/OpenAI dir, "
                                       "train.py output) or a finetune output dir (default: newest "
                                       "out-finetune/, else out/)")
    revision: Optional[str] = field(None, "Hub revision of a --model ORG/NAME (or of the adapter's Hub base): "
                                          "a branch, tag or commit sha (default: main)", metavar="REV")
    adapter: Optional[str] = field(None, "adapter dir, any fine-tuning method (minigpt's or PEFT's; base: --model, "
                                         "else "
                                         "the adapter's base_model_name_or_path)")
    template: Optional[str] = field(None, "prompt template (default: the one the model was tuned with, "
                                          "else alpaca)", choices=list(TEMPLATE_NAMES))
    system: Optional[str] = field(None, "system prompt")
    prompt: Optional[str] = field(None, "answer this one message and exit")
    temperature: float = field(0.7, "sampling temperature (0 = greedy)")
    top_k: Optional[int] = field(None, "sample from the k most likely tokens (0/none = off)")
    top_p: float = field(0.9, "nucleus sampling mass (1 = off)")
    repetition_penalty: float = field(1.0, "penalty for tokens already in the prompt or reply (1 = off)")
    max_new_tokens: Optional[int] = field(None, "longest reply in tokens (default min(256, context/2))")
    seed: Optional[int] = field(None, "random seed for sampling (default: unseeded)")
    stop: list[str] = field([], "extra stop string(s): --stop A --stop B or --stop A B",
                           metavar="TEXT")
    device: str = field("auto", "auto, cpu, cuda, cuda:N")
    weights: str = field("auto", "decoding weights: auto (CPU: exact fp32, repacked for speed), "
                                 "fp16, bf16, int8, w8a8, int4 (CPU, approximate, faster), plain")
    quantize: Optional[str] = field(None, "load the base quantized: nf4 or int8 (minigpt.model.quant; a LoRA "
                                          "adapter stays unmerged on it, as trained with QLoRA)",
                                    choices=QUANT_MODES)
    compile: bool = field(False, "compile each decoding step (CUDA graphs on a GPU; the first "
                                 "reply waits for the compiler)")
    debug: bool = field(False, "show tracebacks")


class _Console:
    """Where text goes: replies to stdout; in pipe mode everything else to stderr."""

    def __init__(self, interactive: bool):
        self.interactive = interactive

    def reply_piece(self, s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    def info(self, msg: str) -> None:
        out = sys.stdout if self.interactive else sys.stderr
        out.write(msg + "\n")
        out.flush()

    def warn(self, msg: str) -> None:
        if self.interactive:
            sys.stdout.flush()
            sys.stdout.write(f"[{msg}]\n")
            sys.stdout.flush()
        else:
            sys.stderr.write(f"chat: {msg}\n")
            sys.stderr.flush()


def _show(session, source: str) -> str:
    s = session.settings
    lines = [f"model: {source} (context {session.block_size} tokens)",
             f"template: {session.template.name}",
             f"system: {session.system!r}" if session.system else "system: (none)",
             "settings: " + ", ".join(f"{k}={getattr(s, k)}" for k in s.NAMES),
             f"stop: {session.user_stops}" if session.user_stops else "stop: (template markers only)",
             f"turns: {len(session.turns)}"]
    return "\n".join(lines)


def _say(session, text: str, con: _Console) -> None:
    """One user turn: stream the reply; Ctrl-C stops it and returns to the prompt."""
    it = None
    wrote = False
    try:
        it = session.reply_stream(text)
        for piece in it:
            con.reply_piece(piece)
            wrote = True
    except ChatError as e:
        con.warn(str(e))
        return
    except KeyboardInterrupt:
        if it is not None:
            it.close()                                   # records the partial reply (if any)
        if wrote:
            sys.stdout.write("\n")
        con.warn("interrupted" + ("; partial reply kept" if wrote else ""))
        return
    sys.stdout.write("\n")
    if con.interactive:
        if not wrote:
            con.warn("empty reply: the model ended its answer at once")
        sys.stdout.write("\n")
    sys.stdout.flush()


def _command(session, line: str, con: _Console, source: str) -> bool:
    """Run a /command; returns False to quit."""
    name, _, arg = line[1:].partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name in ("help", "h", "?"):
        con.info(HELP)
    elif name == "reset":
        session.reset()
        con.info("conversation cleared")
    elif name == "system":
        session.set_system(arg)
        con.info(f"system prompt set: {session.system!r}" if session.system else "system prompt cleared")
    elif name == "set":
        if not arg:
            con.info(_show(session, source).splitlines()[3])
            return True
        parts = arg.split(None, 1)
        if len(parts) != 2:
            con.warn(f"usage: /set NAME VALUE (NAME: {', '.join(session.settings.NAMES)})")
            return True
        try:
            v = session.set(parts[0], parts[1])
        except ChatError as e:
            con.warn(str(e))
            return True
        con.info(f"{parts[0].lower().replace('-', '_')} = {v}")
    elif name in ("show", "settings"):
        con.info(_show(session, source))
    elif name == "save":
        if not arg:
            con.warn("usage: /save FILE")
            return True
        try:
            p = session.save(arg, model=source)
        except OSError as e:
            con.warn(f"cannot save {arg}: {e.strerror or e}")
            return True
        con.info(f"saved {len(session.turns)} turn(s) to {p}")
    else:
        con.warn(f"unknown command /{name}; type /help for the commands")
    return True


def _read_line(interactive: bool) -> Optional[str]:
    if interactive:
        return input("you> ")
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


def chat(args: ChatArgs) -> int:
    """The body of `minigpt chat`."""
    from ..inference.chat import ChatSession
    from .common import decoding_model

    if args.prompt is None and sys.stdin is None:          # started with stdin closed (`<&-`)
        raise CLIError("stdin is closed: pass the message with --prompt TEXT, or pipe the turns in (one per line)")
    interactive = args.prompt is None and sys.stdin.isatty()
    con = _Console(interactive)
    if not interactive and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")            # undecodable input bytes: U+FFFD, not a crash
    loaded, template, weights = decoding_model(args, args.compile)
    try:
        session = ChatSession(loaded.model, template=template, system=args.system, stop=args.stop,
                              on_notice=con.warn, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              max_new_tokens=args.max_new_tokens, seed=args.seed, compile=args.compile)
    except ChatError as e:                                  # name the flag: "top_p ..." -> "--top-p ..."
        name, _, rest = str(e).partition(" ")
        raise CLIError(f"--{name.replace('_', '-')} {rest}") from None

    if args.prompt is not None:
        if not args.prompt.strip():
            raise CLIError("--prompt is empty")
        _say(session, args.prompt, con)
        return 0

    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        src = loaded.source + ("" if args.template or not loaded.template else
                               f" (tuned with the {loaded.template} template)")
        con.info(f"minigpt chat | {src} | template {session.template.name} | weights {weights} | "
                 f"/help for commands, Ctrl-D to quit")
    while True:
        try:
            line = _read_line(interactive)
        except EOFError:
            if interactive:
                sys.stdout.write("\n")
            break
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            con.warn("Ctrl-C: type /quit or press Ctrl-D to leave")
            continue
        text = line.strip()
        if not text:
            con.warn("empty message; type /help for the commands")
            continue
        if text.startswith("/") and not text.startswith("//"):
            if not _command(session, text, con, loaded.source):
                break
            continue
        if text.startswith("//"):
            text = text[1:]
        _say(session, text, con)
    sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    return command_main(ChatArgs, chat, argv, __doc__, "minigpt chat")


if __name__ == "__main__":
    sys.exit(main())
