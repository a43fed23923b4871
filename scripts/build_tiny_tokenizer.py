"""Build the built-in ``tiny`` model assets: tokenizer + Llama config.

Writes into ``src/lockstep/model/builtin/tiny/``:

* ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``
  (plus ``special_tokens_map.json`` if the installed transformers writes it):
  a byte-level BPE tokenizer (vocab 2048, full 256-byte initial alphabet so any
  text encodes, no unk token) with ChatML special tokens
  ``<|endoftext|>``=0, ``<|im_start|>``=1, ``<|im_end|>``=2, ``<|pad|>``=3 and a
  ChatML chat template with ``{% generation %}`` markers, so
  ``apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)``
  yields an assistant-token mask.
* ``config.json``: a ~3M-parameter ``LlamaConfig`` (randomly initialised by
  whoever loads it; no weights are shipped).
* ``generation_config.json``: eos 2 (``<|im_end|>``), pad 3 (``<|pad|>``).

The BPE training corpus is built deterministically from the demo training data
(``src/lockstep/examples/data/demo_train.jsonl``: instruction, input and output texts, plus
the ChatML role names) and a small built-in list of generic English text,
digits and punctuation, so general text still tokenizes reasonably.

The output is reproducible: running the script twice yields byte-identical
files (``--check`` rebuilds in a temporary directory and compares).

Rebuild everything with::

    python scripts/make_demo_data.py && python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "src" / "lockstep" / "model" / "builtin" / "tiny"

VOCAB_SIZE = 2048
MODEL_MAX_LENGTH = 1024

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS: list[str] = [ENDOFTEXT, IM_START, IM_END, PAD]  # ids 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] == 'assistant' %}\n"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

# ~320 frequent English words, so ordinary prose gets whole-word tokens too.
COMMON_WORDS: tuple[str, ...] = (
    "the", "be", "to", "of", "and", "a", "in", "that", "have", "it", "for", "not",
    "on", "with", "he", "as", "you", "do", "at", "this", "but", "his", "by", "from",
    "they", "we", "say", "her", "she", "or", "an", "will", "my", "one", "all",
    "would", "there", "their", "what", "so", "up", "out", "if", "about", "who",
    "get", "which", "go", "me", "when", "make", "can", "like", "time", "no", "just",
    "him", "know", "take", "people", "into", "year", "your", "good", "some",
    "could", "them", "see", "other", "than", "then", "now", "look", "only", "come",
    "its", "over", "think", "also", "back", "after", "use", "two", "how", "our",
    "work", "first", "well", "way", "even", "new", "want", "because", "any",
    "these", "give", "day", "most", "us", "is", "was", "are", "were", "been", "has",
    "had", "did", "said", "made", "went", "got", "man", "woman", "child", "world",
    "life", "hand", "part", "place", "case", "week", "company", "system", "program",
    "question", "government", "number", "night", "point", "home", "water", "room",
    "mother", "area", "money", "story", "fact", "month", "lot", "right", "study",
    "book", "eye", "job", "word", "business", "issue", "side", "kind", "head",
    "house", "service", "friend", "father", "power", "hour", "game", "line", "end",
    "member", "law", "car", "city", "community", "name", "president", "team",
    "minute", "idea", "kid", "body", "information", "school", "face", "others",
    "level", "office", "door", "health", "person", "art", "war", "history", "party",
    "result", "change", "morning", "reason", "research", "girl", "guy", "moment",
    "air", "teacher", "force", "education", "great", "little", "own", "old", "big",
    "high", "different", "small", "large", "next", "early", "young", "important",
    "few", "public", "bad", "same", "able", "last", "long", "best", "better",
    "sure", "free", "true", "whole", "real", "full", "special", "easy", "clear",
    "recent", "certain", "personal", "open", "red", "difficult", "available",
    "likely", "short", "single", "medical", "current", "wrong", "private", "past",
    "foreign", "fine", "common", "poor", "natural", "significant", "similar", "hot",
    "dead", "central", "happy", "serious", "ready", "simple", "left", "physical",
    "general", "environmental", "financial", "blue", "democratic", "dark",
    "various", "entire", "close", "legal", "religious", "cold", "final", "main",
    "green", "nice", "huge", "popular", "traditional", "cultural", "very", "often",
    "always", "never", "still", "again", "really", "already", "usually",
    "sometimes", "today", "tomorrow", "yesterday", "here", "where", "why", "while",
    "during", "before", "under", "between", "through", "without", "within", "along",
    "across", "behind", "beyond", "around", "against", "among", "toward", "upon",
    "until", "since", "each", "every", "both", "either", "neither", "many", "much",
    "more", "less", "least",
)  # fmt: skip

ROLES: list[str] = ["system", "user", "assistant"]

GENERIC_TEXT: list[str] = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly and correctly.",
    "Hello! How can I help you today?",
    "Hi, what is your name?",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "Please answer the following question.",
    "Write a short story about a cat who lives in a big city.",
    "Translate the sentence into French, then explain the grammar.",
    "Summarize the text below in one sentence.",
    "What is the capital of France? The capital of France is Paris.",
    "I think that this is a good idea, but we should test it first.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Once upon a time, there was a little girl who loved to read books.",
    "Can you explain how this works? Yes, of course: it's simple.",
    "We're going to the park; they'll meet us there at 10:30 a.m.",
    "She said, \"Don't worry, I'll be back soon.\"",
    "Thank you very much for your help.",
    "Here is a list of items: first, second, third, and so on.",
    "The answer is 42. The result was 3.14, about 100% correct.",
    "def main():\n    print('hello world')\n    return 0\n",
    "if x > 0 and y < 10:\n    z = x + y * 2\nelse:\n    z = -1\n",
    "for i in range(10):\n\tprint(i)\n",
    '{"name": "Alice", "age": 30, "tags": ["a", "b"]}',
    "Email me at name@example.com or visit https://example.com/path?q=1.",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "January February March April May June July August September October November December",
    "one two three four five six seven eight nine ten eleven twelve hundred thousand million",
    "yes no maybe true false none null user system assistant",
    "This is an example. That is another example. These are examples.",
    "Good morning, good afternoon, good evening and good night.",
    "How are you? I am fine, thanks. And you?",
    "Is it true or false? It depends on the question.",
    "Who, what, when, where, why, and how.",
    "Add the numbers: 1 + 2 = 3, 10 - 4 = 6, 3 * 7 = 21, 8 / 2 = 4.",
]

DIGITS_AND_PUNCT: list[str] = [
    "0 1 2 3 4 5 6 7 8 9",
    "0123456789 10 11 12 13 14 15 16 17 18 19 20 25 50 64 99 100 128 256 512 1000 1024 2024 2025",
    "! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~",
    "... -- --- ** ## == != <= >= -> => :: // /* */ () [] {} \"\" ''",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "\n \n\n \t  ",
]


def load_demo_texts(path: Path) -> list[str]:
    """Texts from the demo data.

    One ChatML-like render (without special tokens) per record, plus every
    distinct input word on its own in lower and upper case (twice, to pass
    ``min_frequency``): ByteLevel pre-tokenization makes a sentence-initial word
    a different pre-token than the same word after a space, and initial/upper
    forms are otherwise too rare to become single tokens. This way every demo
    word, in every form the tasks use, is one token.
    """
    texts: list[str] = []
    words: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            instruction, inp, out = rec["instruction"], rec["input"], rec["output"]
            user = f"{instruction}\n\n{inp}" if inp else instruction
            texts.append(f"user\n{user}\nassistant\n{out}\n")
            words.update(inp.split())
    for w in sorted(words):
        texts.extend([w, w.upper(), f" {w.upper()}"] * 2)
    return texts


def build_corpus(data_path: Path) -> list[str]:
    """Deterministic training corpus (fixed order; no randomness)."""
    generic = (
        GENERIC_TEXT
        + DIGITS_AND_PUNCT
        + [f"{r}\n" for r in ROLES]
        + [" ".join(COMMON_WORDS), " ".join(w.capitalize() for w in COMMON_WORDS)]
    )
    # Twice, so generic words pass ``min_frequency``; the demo data stays dominant.
    return load_demo_texts(data_path) + generic * 2


def train_tokenizer(corpus: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def batches() -> Iterator[list[str]]:
        for i in range(0, len(corpus), 256):
            yield corpus[i : i + 256]

    tok.train_from_iterator(batches(), trainer=trainer, length=len(corpus))
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def build_config(tok: Tokenizer) -> LlamaConfig:
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocab {vocab} exceeds {VOCAB_SIZE}")
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index(IM_END),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        dtype="float32",
        initializer_range=0.02,
        architectures=["LlamaForCausalLM"],
    )


# What ``from_pretrained`` needs; anything else ``save_pretrained`` writes is dropped.
KEEP_FILES: tuple[str, ...] = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def build(data_path: Path, out_dir: Path) -> list[Path]:
    """Build all assets into ``out_dir``; return the written files."""
    tok = train_tokenizer(build_corpus(data_path))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        extra_special_tokens=[ENDOFTEXT, IM_START],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )

    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_tok.save_pretrained(tmp)
        build_config(tok).save_pretrained(tmp)
        GenerationConfig(
            eos_token_id=SPECIAL_TOKENS.index(IM_END),
            pad_token_id=SPECIAL_TOKENS.index(PAD),
        ).save_pretrained(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(tmp).iterdir()):
            if src.name in KEEP_FILES:
                shutil.copyfile(src, out_dir / src.name)
                written.append(out_dir / src.name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="corpus records (default: the demo task over all its words, generated afresh, so "
        "the tokenizer does not depend on the shipped demo file's word subset)",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temp dir and verify it is byte-identical to --out-dir",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as corpus_dir:
        if args.data is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import make_demo_data

            make_demo_data.main(["--out-dir", corpus_dir, "--n-words", "0"])
            args.data = Path(corpus_dir) / "demo_train.jsonl"
        if not args.data.is_file():
            parser.error(f"{args.data} not found")
        return _build_or_check(args)


def _build_or_check(args: argparse.Namespace) -> int:
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = build(args.data, Path(tmp))
            names = [p.name for p in fresh]
            match, mismatch, errors = filecmp.cmpfiles(args.out_dir, tmp, names, shallow=False)
            for name in mismatch + errors:
                print(f"DIFFERS: {name}")
            if mismatch or errors:
                return 1
            print(f"OK: {len(match)} files byte-identical in {args.out_dir}")
            return 0

    for path in build(args.data, args.out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
