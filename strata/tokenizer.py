"""Tokenizer: HF's Rust `tokenizers` pipeline plus the metadata the engine needs.

Three ways in, one object out:
  Tokenizer.from_dir(path)              a model folder with tokenizer.json (+ configs)
  Tokenizer.from_gguf_metadata(meta)    the vocabulary a GGUF embeds (see tokenizer_gguf.py)
  Tokenizer.from_hf(hf_tokenizer)       an already loaded transformers fast tokenizer

BOS/EOS insertion lives in the backend's post-processor, so `encode(add_special_tokens=True)` is
exactly the backend's encode; chat templates render with jinja2 the way transformers renders them.
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as BackendTokenizer

from strata.tokenizer_gguf import SPM_SPACE, backend_from_gguf

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        extra_eos_token_ids: tuple[int, ...] = (),
        is_spm: bool = False,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.is_spm = is_spm
        # bos_token / eos_token / unk_token / pad_token as strings (None where the model has none)
        self.special_tokens = {name: (special_tokens or {}).get(name) for name in _NAMED_SPECIALS}
        self.bos_token_id = self._id_of(self.special_tokens["bos_token"])
        self.eos_token_id = self._id_of(self.special_tokens["eos_token"])
        eos_ids = {self.eos_token_id} | set(extra_eos_token_ids)
        self.eos_token_ids: set[int] = {i for i in eos_ids if i is not None}
        added = backend.get_added_tokens_decoder()
        named = (self._id_of(token) for token in self.special_tokens.values())
        self.all_special_ids: list[int] = sorted(
            {i for i, token in added.items() if token.special} | {i for i in named if i is not None}
        )

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            hint = " (it has only a slow tokenizer.model, which strata cannot read)" if (
                path / "tokenizer.model").is_file() else ""
            raise FileNotFoundError(f"no tokenizer.json in {path}{hint}: strata needs HF's fast tokenizer file")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        specials = {name: _token_text(config.get(name)) for name in _NAMED_SPECIALS}
        for name, value in _read_json(path / "special_tokens_map.json").items():
            if name in specials and specials[name] is None:
                specials[name] = _token_text(value)
        # transformers rebuilds the post-processor only when the config states these flags;
        # otherwise tokenizer.json's own post-processor decides (e.g. Llama-3 adds BOS there).
        if "add_bos_token" in config or "add_eos_token" in config:
            _set_post_processor(backend, specials, config.get("add_bos_token", False),
                                config.get("add_eos_token", False))
        generation = _read_json(path / "generation_config.json")
        extra_eos = generation.get("eos_token_id")
        extra_eos = [extra_eos] if isinstance(extra_eos, int) else list(extra_eos or [])
        template = _chat_template_in_dir(path, config)
        return cls(backend, chat_template=template, special_tokens=specials,
                   extra_eos_token_ids=tuple(extra_eos), is_spm=_looks_spm(backend))

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> "Tokenizer":
        backend = backend_from_gguf(metadata)
        tokens = metadata["tokenizer.ggml.tokens"]
        is_spm = metadata.get("tokenizer.ggml.model") == "llama"

        def token(key: str) -> str | None:
            token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

        specials = {"bos_token": token("bos"), "eos_token": token("eos"),
                    "unk_token": token("unknown"), "pad_token": token("padding")}
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", is_spm)
        add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
        _set_post_processor(backend, specials, add_bos, add_eos)
        # llama.cpp also ends generation at end-of-turn / end-of-message tokens
        extra_eos = tuple(metadata[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                          if metadata.get(key) is not None)
        return cls(backend, chat_template=_pick_template(metadata.get("tokenizer.chat_template")),
                   special_tokens=specials, extra_eos_token_ids=extra_eos, is_spm=is_spm)

    @classmethod
    def from_hf(cls, hf_tokenizer) -> "Tokenizer":
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(hf_tokenizer).__name__} is a slow tokenizer; strata needs a fast one")
        specials = {name: _token_text(getattr(hf_tokenizer, name, None)) for name in _NAMED_SPECIALS}
        return cls(backend, chat_template=_pick_template(getattr(hf_tokenizer, "chat_template", None)),
                   special_tokens=specials, is_spm=_looks_spm(backend))

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens["eos_token"]

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False, **kwargs
    ) -> str | list[int]:
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt, or a template "
                             "(tokenizer.chat_template = '...')")
        # Same variables as transformers: special tokens (kwargs win), tools/documents default None.
        variables = {"tools": None, "documents": None,
                     **{k: v for k, v in self.special_tokens.items() if v is not None}, **kwargs}
        # OpenAI-style clients send content=None; templates handle a missing key, not a None one.
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        text = _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        # The template already writes BOS and friends, so encoding must not add them again.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"is_spm={self.is_spm}, chat_template={'yes' if self.chat_template else 'no'})")


# ---- helpers ------------------------------------------------------------------------------------


def _set_post_processor(backend: BackendTokenizer, specials: dict, add_bos: bool, add_eos: bool) -> None:
    """Make the backend add BOS/EOS itself, as transformers' `update_post_processor` does."""
    bos, eos = specials.get("bos_token"), specials.get("eos_token")
    add_bos, add_eos = bool(add_bos and bos), bool(add_eos and eos)
    if not (add_bos or add_eos):
        backend.post_processor = None
        return
    single = f"{bos}:0 " * add_bos + "$A:0" + f" {eos}:0" * add_eos
    pair = single + f" {bos}:1" * add_bos + " $B:1" + f" {eos}:1" * add_eos
    special_ids = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=special_ids)


def _looks_spm(backend: BackendTokenizer) -> bool:
    """SentencePiece-style pipelines spell spaces as '▁' somewhere in normalizer/pre-tokenizer/decoder."""
    stages = json.loads(backend.to_str())
    return any(SPM_SPACE in json.dumps(stages.get(key), ensure_ascii=False)
               for key in ("normalizer", "pre_tokenizer", "decoder"))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    """Special tokens appear as strings, {"content": ...} dicts or AddedToken objects."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, AddedToken) or hasattr(value, "content"):
        return value.content
    return str(value)


def _chat_template_in_dir(path: Path, config: dict) -> str | None:
    # Newer checkpoints keep the template beside the config rather than inside it.
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return _pick_template(_read_json(path / "chat_template.json").get("chat_template"))
    return _pick_template(config.get("chat_template"))


def _pick_template(template) -> str | None:
    """A template string, or from a list of named templates the one named "default"."""
    if template is None or isinstance(template, str):
        return template
    named = {entry["name"]: entry["template"] for entry in template}
    if "default" not in named:
        raise ValueError(f"chat templates {sorted(named)} include no 'default' one")
    return named["default"]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render as-is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which would change what the model sees
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # Templates come from model files, i.e. untrusted: render in jinja's sandbox, with the globals
    # and whitespace rules transformers uses so prompts match token for token.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
