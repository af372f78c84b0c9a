"""Token ids -> text, one step at a time, exactly as a full decode would spell it.

Decoding each new token on its own is wrong in two ways:
  * byte-level BPE splits one UTF-8 character over several tokens (emoji, CJK, accents), and a
    lone piece decodes to '\ufffd';
  * SentencePiece decoders strip the leading '▁' of the first token they see, so the first token
    after the prompt would lose its space.
So we decode a small window of earlier tokens with and without the new ones and keep the
difference (vLLM's prefix_offset/read_offset technique), and say nothing while the text ends in
'\ufffd' (a character still in flight). The window starts with the prompt's last few tokens, which
is what gives the first output token its leading space.

Stop strings. A stop string can arrive split over several tokens, and everything from its first
character on must never reach the user. Rather than emit and take back (vLLM truncates at the
end), we hold back the longest tail of the text that could still grow into a stop string (a
proper prefix of one): at most len(longest stop) - 1 characters, none when no tail is one.
`flush()` releases what is held once the request finishes for another reason (EOS, length).
Hence `output_text` is always exactly the concatenation of every delta returned so far.
"""

from strata.tokenizer import Tokenizer

# How many prompt tokens seed the window: enough context for the decoder to place spaces
# correctly, few enough that decoding it each step is cheap (vLLM uses the same 5).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: list[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only slow (pure Python) tokenizers act on this; the Rust backend, like vLLM's fast path,
        # decodes special tokens inline. Kept so SamplingParams passes through unchanged.
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop = [s for s in stop if s]  # "" would match everywhere: ignore it
        self.include_stop_str_in_output = include_stop_str_in_output
        self.token_ids: list[int] = []  # output tokens only
        self.stop_reason: str | None = None
        self._text = ""  # every complete character decoded so far (cut at a stop string)
        self._num_released = 0  # how much of _text has been handed out as deltas
        self._finished = False
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._stops_by_first_char: dict[str, list[str]] = {}
        for stop_str in self.stop:
            self._stops_by_first_char.setdefault(stop_str[0], []).append(stop_str)
        # window of ids being decoded: [prefix_offset, read_offset) is already text, [read_offset:]
        # is not yet; the prefix gives the decoder its context.
        self._window_ids = self._prompt_context(list(prompt_token_ids))
        self._prefix_offset = 0
        self._read_offset = len(self._window_ids)

    @property
    def output_text(self) -> str:
        """The text released so far: the concatenation of all deltas (final after flush/stop)."""
        return self._text[: self._num_released]

    @property
    def finished(self) -> bool:
        return self._finished or self.stop_reason is not None

    def update(self, new_token_ids: list[int]) -> str | None:
        """Add tokens; return the newly released text ("" if none yet), None once finished."""
        if self.finished:
            return None
        self.token_ids.extend(new_token_ids)
        self._window_ids.extend(new_token_ids)
        num_chars_before = len(self._text)
        self._text += self._decode_new(force=False)
        return self._release(num_chars_before, final=False)

    def flush(self) -> str:
        """The request ended (EOS, length, abort): release everything still held or in flight.

        A character left incomplete by the last token comes out as '\ufffd', as a full decode would.
        """
        if self.finished:
            return ""
        num_chars_before = len(self._text)
        self._text += self._decode_new(force=True)
        delta = self._release(num_chars_before, final=True)
        self._finished = True
        return delta

    def _prompt_context(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's last few tokens, widened to start on a character boundary.

        A window opening with a UTF-8 continuation byte decodes to '\ufffd' there, and SentencePiece's
        ByteFallback turns a whole run of byte tokens into '\ufffd's if any of it is invalid, which
        would spoil a character the output completes. A character has at most 3 continuation bytes.
        """
        start = max(0, len(prompt_ids) - PROMPT_CONTEXT_TOKENS)
        for _ in range(3):
            text = self.tokenizer.decode(prompt_ids[start:], self.skip_special_tokens)
            if start == 0 or not text.startswith(_REPLACEMENT_CHAR):
                break
            start -= 1
        return prompt_ids[start:]

    def _decode_new(self, force: bool) -> str:
        """Text of window[read_offset:], given the context before it; "" while mid-character."""
        decode = self.tokenizer.decode
        ids = self._window_ids
        prefix_text = decode(ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        full_text = decode(ids[self._prefix_offset:], self.skip_special_tokens)
        if len(full_text) <= len(prefix_text):
            return ""  # e.g. only skipped special tokens so far
        if full_text.endswith(_REPLACEMENT_CHAR) and not force:
            return ""  # a multi-byte character is not complete yet: wait for its other bytes
        # The next window starts where this read began, so its decode has context for spacing.
        self._window_ids = ids[self._read_offset:]
        self._prefix_offset, self._read_offset = 0, len(self._window_ids)
        return full_text[len(prefix_text):]

    def _release(self, num_chars_before: int, final: bool) -> str:
        """Cut at a stop string if one completed, hold back a possible stop start, return the delta."""
        if self.stop:
            hit = self._find_stop(num_chars_before)
            if hit is not None:
                start, stop_str = hit
                self._text = self._text[: start + len(stop_str) if self.include_stop_str_in_output else start]
                self.stop_reason = stop_str
                final = True
        release_upto = len(self._text) if final else self._held_tail_start()
        delta = self._text[self._num_released:release_upto]
        self._num_released = release_upto
        return delta

    # Both searches below start at the held tail (text[_num_released:]), never earlier: a stop
    # string that starts before it would have made a longer tail a stop string's prefix on the last
    # step. So each step reads the new text plus the held tail (at most len(longest stop) - 1
    # characters), and every position that fails here is released, never to be tried again.

    def _find_stop(self, num_chars_before: int) -> tuple[int, str] | None:
        """Earliest-starting stop string that ends in the new text (the first listed on a tie)."""
        best = None
        for stop_str in self.stop:
            # Only an occurrence ending after num_chars_before is new (an older one cut the text).
            index = self._text.find(stop_str, max(self._num_released, num_chars_before - len(stop_str) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop_str)
        return best

    def _held_tail_start(self) -> int:
        """Where the longest tail of the text that is a proper prefix of some stop string starts
        (len(text) when there is none)."""
        text, end = self._text, len(self._text)
        for start in range(max(self._num_released, end - self._max_stop_len + 1), end):
            tail = None
            for stop_str in self._stops_by_first_char.get(text[start], ()):
                if len(stop_str) > end - start:
                    tail = tail or text[start:]
                    if stop_str.startswith(tail):
                        return start
        return end
