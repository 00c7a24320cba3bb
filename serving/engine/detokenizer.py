"""Incremental detokenization with stop strings.

Feed generated token ids one (or a few) at a time, get back only the text that is new and final:

- a character whose bytes are split across tokens is emitted once complete (never a U+FFFD partial);
- special tokens are skipped in the text;
- the reply is cut before the first occurrence of any stop string, and text that might be the start of a
  stop string is held back until the next tokens disambiguate it (or `flush()` at the end releases it).

Decoding uses a small sliding window (prefix/read offsets, as in vLLM and TGI) so each step costs O(1)
in the reply length and tokenizers whose pieces depend on their left context decode correctly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

_PROMPT_CONTEXT = 5  # prompt tokens decoded as left context for the first reply tokens
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: Sequence[str] = (),
        prompt_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        context = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""  # all decoded reply text (including what is held back)
        self._emitted = 0  # characters of _text handed out
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that matched, if any

    @property
    def text(self) -> str:
        """The reply text handed out so far."""
        return self._text[: self._emitted]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip_special))

    def _decode_new(self, final: bool) -> str:
        """Text that the tokens past the read offset add; empty while a character is incomplete."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) and not final:
            return ""  # e.g. a special token, or a byte that does not complete a character yet
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""  # wait for the rest of the character
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self) -> str:
        """Apply stop strings to the pending text; return what can be emitted now."""
        pending = self._text[self._emitted :]
        if not self._stops or not pending:
            self._emitted = len(self._text)
            return pending
        # Emitted text never holds the start of a stop string, so a match starts in the pending part.
        best = -1
        for stop in self._stops:
            at = self._text.find(stop, self._emitted)
            if at != -1 and (best == -1 or at < best):
                best, self.stop_string = at, stop
        if best != -1:
            out = self._text[self._emitted : best]
            self._text = self._text[:best]
            self._emitted = best
            self.stopped = True
            return out
        hold = 0
        for k in range(min(self._max_stop - 1, len(pending)), 0, -1):
            tail = pending[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                hold = k
                break
        end = len(self._text) - hold
        out = self._text[self._emitted : end]
        self._emitted = end
        return out

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feed new token ids; return the new text (may be empty). After a stop match, returns ""."""
        if self.stopped:
            return ""
        if isinstance(token_ids, int):
            self._ids.append(token_ids)
        else:
            self._ids.extend(token_ids)
        self._text += self._decode_new(final=False)
        return self._release()

    def flush(self) -> str:
        """The generation ended: release incomplete characters and held-back stop-string prefixes."""
        if self.stopped:
            return ""
        self._text += self._decode_new(final=True)
        out = self._release()
        if not self.stopped:
            out += self._text[self._emitted :]
            self._emitted = len(self._text)
        return out
