"""`hpclora chat` on the real small model, on CPU: through a pseudo-terminal as a user types (readline, a
Japanese line, streamed answers, /compare, Ctrl-D), and in-process to check that the conversation really
carries over from turn to turn."""

from __future__ import annotations

import codecs
import io
import os
import pty
import select
import subprocess
import sys
import time

import torch

from hpclora.results.chat import chat, set_sampling
from hpclora.results.generate import Sampling, answer, answer_text, load_run, printer

PROMPT = "you> "


class Terminal:
    """A child process on a pseudo-terminal, read in the chunks in which it writes."""

    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "COLUMNS": "100", "PYTHONIOENCODING": "utf-8"}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.text = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")()  # a character may be split across two reads

    def read_until(self, marker: str, timeout: float = 300) -> list[str]:
        """The chunks read until the output (since the last call) contains `marker` at its end."""
        chunks, start, deadline = [], len(self.text), time.time() + timeout
        while time.time() < deadline:
            ready, _, _ = select.select([self.master], [], [], 1)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # the child has closed the terminal
                    break
                chunk = self.decoder.decode(data)
                chunks.append(chunk)
                self.text += chunk
                if self.text[start:].rstrip(" ").endswith(marker.rstrip(" ")):
                    return chunks
        raise AssertionError(f"no {marker!r} within {timeout}s; output so far:\n{self.text[start:]}")

    def type(self, line: str) -> None:
        os.write(self.master, line.encode("utf-8"))


def test_a_conversation_through_a_terminal_streams_compares_and_leaves_on_ctrl_d(real_run):
    term = Terminal([sys.executable, "-m", "hpclora", "chat", str(real_run), "--max-new-tokens", "24"])
    term.read_until(PROMPT)
    assert "chatting with" in term.text and "template" in term.text

    term.type("What is the largest planet in the solar system?\r")
    chunks = term.read_until(PROMPT)
    first = "".join(chunks)
    assert "adapter> " in first
    after = [c for c in chunks if c.strip()]
    assert len(after) >= 3, after  # the prompt echo, then the answer in pieces as it is generated, then the prompt

    term.type("日本で一番長い川は何ですか？\r")  # wide characters through readline
    second = "".join(term.read_until(PROMPT))
    assert "日本で一番長い川は何ですか？" in second  # echoed as typed
    reply = second.split("adapter> ", 1)[1].rsplit(PROMPT, 1)[0].strip()
    assert reply

    term.type("/compare\r")
    compared = "".join(term.read_until(PROMPT))
    assert "base model" in compared and "with adapter" in compared
    rows = compared.splitlines()
    body = rows[next(i for i, row in enumerate(rows) if "-+-" in row) + 1:]
    right_column = " ".join(row.split(" | ", 1)[1].strip() for row in body if " | " in row)
    assert right_column.replace(" ", "").startswith(reply.splitlines()[0].replace(" ", "")[:10])

    term.type("\x04")  # Ctrl-D
    assert term.proc.wait(timeout=60) == 0


def test_every_turn_is_answered_with_the_conversation_before_it(real_run):
    lines = "Name a planet.\nAnd one more?\n/sample temperature=0\n"
    out = io.StringIO()
    assert chat(real_run, Sampling(max_new_tokens=16), stdin=io.StringIO(lines), out=out) == 0
    replies = [part.split("\nyou> ")[0].strip() for part in out.getvalue().split("adapter> ")[1:]]
    assert len(replies) == 2

    model, tokenizer, cfg = load_run(real_run)
    greedy = Sampling(max_new_tokens=16)
    first = answer(model, tokenizer, cfg.data.template, [{"role": "user", "content": "Name a planet.", "input": ""}], greedy)
    conversation = [{"role": "user", "content": "Name a planet.", "input": ""}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And one more?", "input": ""}]
    assert replies == [first, answer(model, tokenizer, cfg.data.template, conversation, greedy)]


def test_an_answer_cut_inside_a_japanese_character_drops_the_half_character(tokenizer):
    ids = tokenizer.encode("日本で一番長い川", add_special_tokens=False)
    assert answer_text(tokenizer, ids) == "日本で一番長い川"
    cut = ids[:-1]  # 川 is two byte-level tokens
    assert tokenizer.decode(cut).endswith("\ufffd")
    assert answer_text(tokenizer, cut) == "日本で一番長い"
    streamed = io.StringIO()
    stream = printer(tokenizer, streamed)
    stream.put(torch.tensor([tokenizer.encode("Q:")]))  # as generate() feeds a streamer: the prompt (skipped),
    for token in cut:  # then one token at a time, then end()
        stream.put(torch.tensor([token]))
    stream.end()
    assert streamed.getvalue() == "日本で一番長い\n"


def test_sample_settings_are_checked_like_the_flags():
    s = set_sampling(Sampling(), ["temperature=0.9", "top_p=0.5", "max_new_tokens=7"])
    assert (s.do_sample, s.temperature, s.top_p, s.max_new_tokens) == (True, 0.9, 0.5, 7)
    assert set_sampling(s, ["greedy"]).do_sample is False
    for bad in (["top_p=2"], ["temperature"], ["colour=red"], ["top_k=many"]):
        try:
            set_sampling(s, bad)
        except Exception as exc:  # noqa: BLE001
            assert type(exc).__name__ == "UserError", exc
        else:
            raise AssertionError(f"{bad} accepted")


def test_a_merged_model_chats_in_its_runs_template_and_compares_with_its_base(real_run, tmp_path):
    from hpclora.results.merge import merge

    merged = merge(real_run, tmp_path / "merged", "fp32")
    out = io.StringIO()
    assert chat(merged, Sampling(max_new_tokens=12), stdin=io.StringIO("Name a planet.\n/compare\n"), out=out) == 0
    text = out.getvalue()
    model, tokenizer, cfg = load_run(real_run)
    assert f"chatting with {merged} (merged from " in text and f"template {cfg.data.template};" in text  # from MERGED_FROM.json
    reply = text.split("model> ", 1)[1].split("\nyou> ")[0].strip()
    assert reply == answer(model, tokenizer, cfg.data.template, "Name a planet.", Sampling(max_new_tokens=12))
    assert "base model" in text and "merged model" in text
