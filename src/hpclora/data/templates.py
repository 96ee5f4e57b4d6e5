"""Prompt templates: messages -> pieces of text, each marked as trained (response) or not (prompt).

The same rendering is used for training and for `hpclora generate`, so a prompt is tokenized identically
in both. `EOS` stands for the tokenizer's end-of-sequence token; it closes every response and trains, so
the model learns to stop.
"""

from __future__ import annotations

TEMPLATES = ("alpaca", "alpaca_ja", "calm", "chat", "none")

EOS = "\x00<eos>\x00"  # a marker no real text contains; replaced by the EOS token id when tokenizing

Piece = tuple[str, bool]  # (text or EOS, trains)

# Wording of the Stanford Alpaca prompt and of the Japanese Alpaca translation used by Japanese
# instruction-tuning write-ups (Japanese-Alpaca-LoRA, databricks-dolly-15k-ja).
ALPACA = {
    "preamble_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
    ),
    "preamble": "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "instruction": "### Instruction:",
    "input": "### Input:",
    "response": "### Response:",
}
ALPACA_JA = {
    "preamble_input": (
        "以下に、あるタスクを説明する指示があり、それに付随する入力が更なる文脈を提供しています。"
        "リクエストを適切に完了するための回答を記述してください。"
    ),
    "preamble": "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を記述してください。",
    "instruction": "### 指示:",
    "input": "### 入力:",
    "response": "### 応答:",
}


def render(template: str, messages: list[dict], tokenizer=None) -> list[Piece]:
    """Pieces for a whole conversation. When the last message is a user turn, the pieces end with the
    response header, ready for generation."""
    if template in ("alpaca", "alpaca_ja"):
        return _alpaca(messages, ALPACA if template == "alpaca" else ALPACA_JA)
    if template == "calm":
        return _calm(messages)
    if template == "none":
        return _plain(messages)
    if template == "chat":
        return _chat(messages, tokenizer)
    raise ValueError(f"unknown template {template!r}")


def _user_text(message: dict) -> str:
    return message["content"] + (f"\n\n{message['input']}" if message.get("input") else "")


def _answer(message: dict) -> list[Piece]:
    return [(message["content"], True), (EOS, True)]


def _alpaca(messages: list[dict], words: dict) -> list[Piece]:
    pieces: list[Piece] = []
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    first_user = next((m for m in messages if m["role"] == "user"), {})
    preamble = system or (words["preamble_input"] if first_user.get("input") else words["preamble"])
    opened = False
    for m in messages:
        if m["role"] == "user":
            block = f"{preamble}\n\n" if not opened else ""
            block += f"{words['instruction']}\n{m['content']}\n\n"
            if m.get("input"):
                block += f"{words['input']}\n{m['input']}\n\n"
            block += f"{words['response']}\n"
            pieces.append((block, False))
            opened = True
        elif m["role"] == "assistant":
            pieces.extend(_answer(m))
    return pieces


def _calm(messages: list[dict]) -> list[Piece]:
    # The OpenCALM instruction format: ユーザー: … / 入力: … / システム: … then EOS.
    pieces: list[Piece] = []
    for m in messages:
        if m["role"] == "system":
            pieces.append((f"{m['content']}\n", False))
        elif m["role"] == "user":
            block = f"ユーザー: {m['content']}\n"
            if m.get("input"):
                block += f"入力: {m['input']}\n"
            pieces.append((block + "システム: ", False))
        elif m["role"] == "assistant":
            pieces.extend(_answer(m))
    return pieces


def _plain(messages: list[dict]) -> list[Piece]:
    pieces: list[Piece] = []
    for m in messages:
        if m["role"] == "text":
            pieces.extend(_answer(m))
        elif m["role"] in ("system", "user"):
            pieces.append((_user_text(m) + "\n", False))
        elif m["role"] == "assistant":
            pieces.extend(_answer(m))
    return pieces


def _chat(messages: list[dict], tokenizer) -> list[Piece]:
    """The tokenizer's own chat template. Each assistant turn is found by rendering the conversation up
    to it with and without that turn: the difference is exactly what the model must produce."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.template=chat needs a tokenizer with a chat template; this model has none (use alpaca, alpaca_ja, calm or none)")
    plain = [{"role": m["role"], "content": _user_text(m) if m["role"] == "user" else m["content"]} for m in messages]
    pieces: list[Piece] = []
    done = ""
    for i, m in enumerate(plain):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(plain[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(plain[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template renders earlier turns differently once later turns are added; use another data.template")
        pieces.append((prompt[len(done):], False))
        pieces.append((full[len(prompt):], True))
        done = full
    if plain and plain[-1]["role"] != "assistant":
        prompt = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        pieces.append((prompt[len(done):], False))
    return pieces
