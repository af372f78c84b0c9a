"""SamplingParams: how one request is sampled and when it stops.

Names and defaults copy vLLM's `SamplingParams` so that code written for vLLM runs unchanged.
Every field is checked in `__post_init__`: a bad value is a user error, so it must surface as a
`ValueError` naming the parameter, the value and the allowed range, before the request reaches the
engine (DESIGN.md: errors a user can cause never crash the engine).
"""

import copy
import enum
import math
from dataclasses import dataclass

# Below this temperature sampling is greedy; vLLM's `_SAMPLING_EPS`.
SAMPLING_EPS = 1e-5


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.IntEnum):
    """What the engine returns for a request after a step (vLLM's names)."""
    CUMULATIVE = 0    # everything so far, after every step that touched it
    DELTA = 1         # not supported yet: strata's streams diff cumulative outputs themselves
    FINAL_ONLY = 2    # nothing until it finishes (LLM.generate: no per-step output to build)


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, vLLM's older spelling) turns it off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length (the engine fills it in)
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per token; the sampled token's is always added
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if self.output_kind not in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
            raise ValueError(f"output_kind must be RequestOutputKind.CUMULATIVE or FINAL_ONLY, got "
                             f"{self.output_kind!r}")
        self.output_kind = RequestOutputKind(self.output_kind)
        self._check_counts()
        self._check_penalties()
        self._check_sampling()
        self._normalise_stops()
        self._normalise_logit_bias()
        if self.temperature < SAMPLING_EPS:
            # Greedy: truncation cannot change the argmax, so reset it the way vLLM does; the
            # sampler then treats every greedy row alike.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    # ---- validation, split by topic so each piece fits on a screen ----

    def _check_counts(self) -> None:
        _require_int("n", self.n, low=1)
        if self.best_of is not None:
            _require_int("best_of", self.best_of, low=1)
            if self.best_of != self.n:
                # strata returns every sequence it samples; best_of > n would need beam-like
                # ranking of finished sequences, which vLLM v1 dropped too.
                raise ValueError(
                    f"best_of must be None or equal to n ({self.n}), got {self.best_of}"
                )
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens, low=1)
        _require_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if self.logprobs is not None:
            _require_int("logprobs", self.logprobs, low=0)
        if self.prompt_logprobs is not None:
            _require_int("prompt_logprobs", self.prompt_logprobs, low=0)
        if self.seed is not None:
            _require_int("seed", self.seed)

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = _require_float(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        self.repetition_penalty = _require_float("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def _check_sampling(self) -> None:
        self.temperature = _require_float("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _require_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _require_int("top_k", self.top_k, low=-1)
        if self.top_k == -1:
            self.top_k = 0  # one spelling of "off" inside strata
        self.min_p = _require_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    def _normalise_stops(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        for token_id in self.stop_token_ids:
            _require_int("stop_token_ids", token_id, low=0)
        self.bad_words = [] if self.bad_words is None else list(self.bad_words)

    def _normalise_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
        normalised = {}
        for key, bias in self.logit_bias.items():
            # JSON object keys are always strings ("50256"), so accept digit strings.
            token_id = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            _require_int("logit_bias token id", token_id, low=0)
            normalised[token_id] = _require_float(f"logit_bias[{token_id}]", bias)
        self.logit_bias = normalised

    # ---- queries ----

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError if a token id given by the user lies outside the vocabulary.

        SamplingParams does not know the model; the engine calls this when it accepts the request
        so that an out-of-range id fails the request instead of an index op inside the sampler.
        """
        named_ids = [("stop_token_ids", self.stop_token_ids or [])]
        named_ids.append(("logit_bias", list(self.logit_bias or {})))
        for name, ids in named_ids:
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise ValueError(f"{name} must be token ids < vocab size {vocab_size}, got {bad}")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    def clone(self) -> "SamplingParams":
        # Deep copy: stop lists and logit_bias are mutable and must not be shared between the
        # n sequences of a request or between requests that started from one params object.
        return copy.deepcopy(self)


def _require_int(name: str, value, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _require_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    return float(value)
