"""IncrementalDetokenizer: streamed deltas add up to exactly what a full decode gives.

Two vocabularies: SmolLM2's byte-level BPE (multi-byte characters split over tokens) and a small
SentencePiece-style one (byte fallback, '▁' spaces the decoder strips at the start of a decode).
"""

import random

import pytest
from test_tokenizer import read_gguf_metadata, smollm_gguf_path, spm_metadata

from strata.engine.detokenizer import IncrementalDetokenizer
from strata.tokenizer import Tokenizer

SP = "\u2581"
MULTI_BYTE_TEXT = "héllo wörld, 日本語のテキスト 👋🏽🎉 café naïve — “quotes” ß\n\tend"


@pytest.fixture(scope="module")
def smollm():
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(smollm_gguf_path()))


@pytest.fixture(scope="module")
def spm():
    return Tokenizer.from_gguf_metadata(spm_metadata())


def stream(tokenizer, prompt_ids, output_ids, chunk=1, **kwargs):
    """Feed output_ids `chunk` at a time; return (detokenizer, deltas including flush's)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    deltas = []
    for start in range(0, len(output_ids), chunk):
        delta = detok.update(output_ids[start:start + chunk])
        if delta is None:
            break
        assert "".join(deltas) + delta == detok.output_text
        deltas.append(delta)
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.output_text
    return detok, deltas


def expected_text(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    """What the output adds to the prompt's text when both are decoded as one sequence."""
    full = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens)
    assert full.startswith(prompt)
    return full[len(prompt):]


def random_spm_ids(tokenizer, rng, length):
    """Random SentencePiece output made of whole units: pieces, special tokens and complete
    characters spelled in byte-fallback tokens (an invalid byte run would decode differently
    as a whole than in parts, since ByteFallback turns the entire run into '\ufffd's)."""
    pieces = [i for i in range(tokenizer.vocab_size) if not tokenizer.convert_ids_to_tokens([i])[0].startswith("<")]
    ids = []
    while len(ids) < length:
        kind = rng.random()
        if kind < 0.7:
            ids.append(rng.choice(pieces))
        elif kind < 0.8:
            ids.append(rng.choice([1, 2, tokenizer.token_to_id("<|turn|>"), tokenizer.token_to_id("<tool>")]))
        else:
            char = rng.choice("日本語のé€👋🏽\n")
            ids.extend(tokenizer.token_to_id(f"<0x{b:02X}>") for b in char.encode("utf-8"))
    return ids


# ---- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3])
def test_byte_level_multibyte_text_streams_exactly(smollm, chunk):
    prompt = smollm.encode("Say something:")
    output = smollm.encode(MULTI_BYTE_TEXT, add_special_tokens=False)
    detok, deltas = stream(smollm, prompt, output, chunk=chunk)
    assert detok.output_text == MULTI_BYTE_TEXT == smollm.decode(output)
    assert not any("\ufffd" in d for d in deltas)
    assert detok.token_ids == output
    # some character really was split over tokens, and that step emitted nothing
    assert chunk > 1 or "" in deltas[:-1]


def test_byte_level_random_tokens_stream_exactly(smollm):
    rng = random.Random(0)
    # the last prompt ends in an emoji split over several tokens: the window must not start inside it
    prompts = [smollm.encode("Hello"), [], smollm.encode("テキスト👋🏽")]
    for trial in range(200):
        output = [rng.randrange(smollm.vocab_size) for _ in range(rng.randrange(1, 40))]
        for prompt_ids in prompts:
            detok, _ = stream(smollm, prompt_ids, output, chunk=1 + trial % 3)
            assert detok.output_text == expected_text(smollm, prompt_ids, output)
        assert stream(smollm, [], output, skip_special_tokens=False)[0].output_text == smollm.decode(output, False)


def test_sentencepiece_first_token_keeps_its_space(spm):
    prompt = spm.encode("hello")
    world = spm.token_to_id(f"{SP}world")
    assert spm.decode([world]) == "world"  # what naive per-token decoding would emit
    detok, deltas = stream(spm, prompt, [world, spm.token_to_id(f"{SP}the")])
    assert deltas[:2] == [" world", " the"]
    assert detok.output_text == " world the" == expected_text(spm, prompt, detok.token_ids)
    # with no prompt there is no space to keep: same as decoding the output alone
    assert stream(spm, [], [world])[0].output_text == "world"


def test_sentencepiece_byte_fallback_streams_exactly(spm):
    prompt = spm.encode("hello")
    output = spm.encode(" café 日本語 👋🏽 naïve\nthe end", add_special_tokens=False)
    assert "<0xE6>" in spm.convert_ids_to_tokens(output)
    detok, deltas = stream(spm, prompt, output)
    assert detok.output_text == expected_text(spm, prompt, output) == "  café 日本語 👋🏽 naïve\nthe end"
    assert not any("\ufffd" in d for d in deltas)


def test_sentencepiece_random_units_stream_exactly(spm):
    rng = random.Random(1)
    for trial in range(200):
        prompt = spm.encode(rng.choice(["hello world", "The quick", "日本"]))
        output = random_spm_ids(spm, rng, rng.randrange(1, 30))
        for skip in (True, False):
            detok, deltas = stream(spm, prompt, output, chunk=1 + trial % 2, skip_special_tokens=skip)
            assert detok.output_text == expected_text(spm, prompt, output, skip)
            assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_skipped_or_kept(smollm):
    output = smollm.encode("hi<|im_end|>", add_special_tokens=False)
    assert stream(smollm, [], output)[0].output_text == "hi"
    assert stream(smollm, [], output, skip_special_tokens=False)[0].output_text == "hi<|im_end|>"


# ---- stop strings -------------------------------------------------------------------------------


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(smollm, include):
    text = " The answer is 42. Then more text follows."
    output = smollm.encode(text, add_special_tokens=False)
    stop = "swer is 4"  # starts inside " answer" and spans " is" and " 4"
    detok = IncrementalDetokenizer(smollm, smollm.encode("Q:"), stop=["nope", stop],
                                   include_stop_str_in_output=include)
    released = ""
    for token_id in output:
        delta = detok.update([token_id])
        if delta is None:
            break
        released += delta
        assert "swer" not in released or include  # the stop string's start is held back, never shown
    assert detok.stop_reason == stop
    expected = " The an" + (stop if include else "")
    assert released == detok.output_text == expected
    assert detok.update(smollm.encode(" more")) is None and detok.flush() == ""
    assert detok.output_text == expected


def test_held_back_text_is_released_by_flush(smollm):
    output = smollm.encode(" ab xy", add_special_tokens=False)
    detok, deltas = stream(smollm, [], output, stop=["xyz", "b!"])
    assert detok.stop_reason is None
    assert deltas[-1].endswith("xy")  # held until the request ended
    assert detok.output_text == " ab xy"


def test_earliest_stop_string_wins(spm):
    output = spm.encode("the quick brown fox", add_special_tokens=False)
    detok, _ = stream(spm, spm.encode("hello"), output, stop=["fox", "quick"])
    assert detok.stop_reason == "quick" and detok.output_text == " the "


def test_multibyte_stop_string(smollm):
    output = smollm.encode("数字は日本語です", add_special_tokens=False)
    detok, deltas = stream(smollm, [], output, stop=["本語"])
    assert detok.output_text == "数字は日" and detok.stop_reason == "本語"
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("vocab", ["smollm", "spm"])
def test_random_stop_strings(request, vocab):
    tokenizer = request.getfixturevalue(vocab)
    rng = random.Random(2)
    prompt = tokenizer.encode("hello")
    for trial in range(100):
        if vocab == "spm":
            output = random_spm_ids(tokenizer, rng, 25)
        else:
            output = tokenizer.encode(rng.choice([MULTI_BYTE_TEXT, "the quick brown fox jumps over the lazy dog"]),
                                      add_special_tokens=False)
        full = expected_text(tokenizer, prompt, output)
        start = rng.randrange(len(full))
        stop = full[start:start + rng.randrange(1, 6)]
        detok, deltas = stream(tokenizer, prompt, output, chunk=1 + trial % 3, stop=[stop])
        assert detok.stop_reason == stop
        assert detok.output_text == full[:full.index(stop)]
        assert not any("\ufffd" in d for d in deltas)


class CharTokenizer:
    """One token per character (the id is its code point), so tests can stream arbitrary text."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def simple_stop_stream(chunks, stops, include_stop_str_in_output):
    """The plain method the detokenizer must agree with: after each chunk, search the whole text
    for every stop string, and hold back the longest tail found among all their proper prefixes.
    Returns (deltas, text, stop)."""
    stops = [s for s in stops if s]
    proper_prefixes = {s[:n] for s in stops for n in range(1, len(s))}
    text, released, deltas = "", 0, []
    for chunk in chunks:
        text += chunk
        hits = [(text.find(s), i) for i, s in enumerate(stops) if s in text]
        if hits:
            start, i = min(hits)   # earliest start; the first listed on a tie
            text = text[: start + len(stops[i]) if include_stop_str_in_output else start]
            deltas.append(text[released:])
            return deltas, text, stops[i]
        held = max((n for n in range(1, len(text) + 1) if text[-n:] in proper_prefixes), default=0)
        deltas.append(text[released:len(text) - held])
        released = len(text) - held
    deltas.append(text[released:])
    return deltas, text, None


def test_many_long_stop_strings_match_the_simple_method():
    rng = random.Random(3)
    for trial in range(300):
        alphabet = rng.choice(["ab", "abc", "ab c\n"])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200)))
        stops, share_of_pieces = [], rng.choice([0.0, 0.02, 0.3])
        for _ in range(rng.randrange(1, 65)):
            if rng.random() < share_of_pieces:   # a piece of the text, so that a stop string occurs
                start = rng.randrange(len(text))
                stops.append(text[start:start + rng.randrange(1, 60)])
            else:                    # long ones that mostly match only as prefixes
                stops.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120))))
        if rng.random() < 0.2:
            stops.append(rng.choice(stops))   # duplicates and "" change nothing
            stops.append("")
        include = rng.random() < 0.5
        chunks, i = [], 0
        while i < len(text):
            size = rng.choice([1, 1, 2, 3, 8, 40])
            chunks.append(text[i:i + size])
            i += size
        expected_deltas, expected_text, expected_stop = simple_stop_stream(chunks, stops, include)

        detok = IncrementalDetokenizer(CharTokenizer(), [], stop=stops, include_stop_str_in_output=include)
        deltas = []
        for chunk in chunks:
            delta = detok.update([ord(c) for c in chunk])
            if delta is None:
                break
            deltas.append(delta)
        if detok.stop_reason is None:
            deltas.append(detok.flush())
        assert (deltas, detok.output_text, detok.stop_reason) == (expected_deltas, expected_text, expected_stop), (
            trial, chunks, stops, include)
