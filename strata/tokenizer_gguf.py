"""Rebuild a `tokenizers.Tokenizer` from the vocabulary a GGUF file embeds.

A GGUF carries no tokenizer.json: llama.cpp stores the tokens, their types, the BPE merges (or, for
SentencePiece vocabularies, per-token scores) and the name of the pre-tokenizer as metadata. We turn
those back into the pipeline HF's Rust library runs, choosing each stage the way llama.cpp's
llama-vocab.cpp does for that model/pre name, so ids match what llama.cpp (and the original HF
tokenizer) produce.

Special-token ids, BOS/EOS post-processing and the chat template are read by `strata.tokenizer`.
"""

import logging

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

logger = logging.getLogger(__name__)

SPM_SPACE = "\u2581"  # '▁', SentencePiece's visible space

# llama_token_type values (llama.cpp's llama-vocab.h)
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Split regexes as llama.cpp spells them (llama-vocab.cpp, `llm_tokenizer_bpe`).
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> split family. The names follow llama.cpp's `tokenizer_pre` checks.
#   gpt2:      GPT-2's regex (what ByteLevel(use_regex=True) runs)
#   digits:    every digit on its own, then GPT-2's regex (SmolLM, StarCoder, ...)
#   llama3:    Llama-3's regex; llama.cpp also sets ignore_merges for these
#   qwen2:     Llama-3's regex but single digits
_PRE_TOKENIZER_FAMILIES = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "command-r": "digits",
    "codeshell": "digits", "exaone": "digits", "minerva-7b": "digits",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    "pixtral": "llama3", "smaug-bpe": "llama3", "dbrx": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "megrez": "qwen2",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def backend_from_gguf(metadata: dict) -> BackendTokenizer:
    """The tokenizers pipeline (no post-processor) for the vocabulary in `metadata`."""
    model_name = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens: this file embeds no vocabulary")
    if model_name == "gpt2":
        return _byte_level_backend(metadata)
    if model_name == "llama":
        return _sentencepiece_backend(metadata)
    raise ValueError(
        f"GGUF tokenizer.ggml.model={model_name!r} is not supported; strata reads 'gpt2' (byte-level "
        "BPE) and 'llama' (SentencePiece-style BPE)"
    )


def _byte_level_backend(metadata: dict) -> BackendTokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = list(metadata["tokenizer.ggml.tokens"])
    # A few converters store added tokens as raw text (e.g. containing a real space); the BPE model
    # only ever sees byte-level spelled strings, so spell those the same way.
    spelled = [
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens
    ]
    vocab = {token: index for index, token in enumerate(spelled)}
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    family = _PRE_TOKENIZER_FAMILIES.get(pre_name)
    if family is None:
        logger.warning("unknown GGUF tokenizer.ggml.pre=%r; splitting text with GPT-2's regex", pre_name)
        family = "gpt2"
    backend = BackendTokenizer(
        models.BPE(vocab=vocab, merges=_merges(metadata, vocab), ignore_merges=family == "llama3")
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(family)
    backend.decoder = decoders.ByteLevel()
    # A marked token spelled outside the byte alphabet was respelled above, so its raw form is no
    # vocabulary entry; adding it would mint a new id past the model's embedding rows. Skip those
    # (transformers does the same).
    _add_marked_tokens(backend, tokens, metadata, keep=lambda t: set(t) <= alphabet)
    return backend


def _byte_level_pre_tokenizer(family: str):
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "digits":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    split = _LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _sentencepiece_backend(metadata: dict) -> BackendTokenizer:
    tokens = list(metadata["tokenizer.ggml.tokens"])
    vocab = {token: index for index, token in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    backend = BackendTokenizer(
        models.BPE(vocab=vocab, merges=_merges(metadata, vocab), unk_token=unk, fuse_unk=True,
                   byte_fallback=True)
    )
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer, not Metaspace(prepend_scheme="first"): it runs on every stretch of text between
    # special tokens, so "<s>Hi" and "</s>Hi" both give "▁Hi" -- what llama.cpp does (it re-adds
    # the space prefix after each special token) and what SentencePiece did on the original text.
    steps = [normalizers.Prepend(SPM_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPM_SPACE)])
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # the space the normalizer prepended
    backend.decoder = decoders.Sequence(steps)
    _add_marked_tokens(backend, tokens, metadata, keep=lambda t: True)
    return backend


def _merges(metadata: dict, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The file's merges, or (SentencePiece files store scores instead) merges implied by scores."""
    merges = metadata.get("tokenizer.ggml.merges")
    if merges:
        return [tuple(merge.split(" ", 1)) for merge in merges]
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF vocabulary has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    return merges_from_scores(vocab, dict(zip(metadata["tokenizer.ggml.tokens"], scores)))


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging.

    SentencePiece merges the adjacent pair whose union has the best score; a BPE model does the
    same if each way of splitting a piece into two known pieces becomes a merge ranked by the
    piece's score. Ties: longer left piece first, then vocabulary order (as transformers does, so
    ids match its GGUF loader exactly).
    """
    candidates = []
    for piece, score in scores.items():
        splits = [
            (piece[:cut], piece[cut:], score)
            for cut in range(1, len(piece))
            if piece[:cut] in vocab and piece[cut:] in vocab
        ]
        candidates.extend(sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]])))
    candidates.sort(key=lambda s: (s[2], len(s[0]), len(s[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _add_marked_tokens(backend: BackendTokenizer, tokens: list[str], metadata: dict, keep) -> None:
    """Register control and user-defined tokens as added tokens so text never splits them."""
    types = metadata.get("tokenizer.ggml.token_type") or ()
    control = [t for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL and keep(t)]
    user_defined = [t for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_USER_DEFINED and keep(t)]
    # The named tokens are special even if the file typed them otherwise (e.g. <unk> is UNKNOWN).
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens) and keep(tokens[token_id]):
            control.append(tokens[token_id])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(control)])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
