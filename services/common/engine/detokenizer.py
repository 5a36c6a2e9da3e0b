"""Incremental detokenizer for streamed completions.

Byte-level BPE tokens are byte strings, and one UTF-8 character may span
several tokens. The detokenizer releases text only up to the last complete
character, and holds back any tail of the text that could be the start of a
stop string, so a stop string never reaches the caller, not even in part.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence


class IncrementalDetokenizer:
    """Turn token ids into text deltas, one step at a time.

    ``token_bytes[i]`` is the byte string of token ``i`` (b"" for control
    tokens). Invalid UTF-8 from the model is replaced by U+FFFD.
    """

    def __init__(self, token_bytes: Sequence[bytes], stop: Sequence[str] = ()) -> None:
        self._token_bytes = token_bytes
        self._stop = tuple(stop)
        self._max_stop_chars = max((len(s) for s in self._stop), default=0)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Decoded text that is not released yet because it may begin a stop string.
        self._pending = ""
        self.stop_found: str | None = None

    def add(self, token_ids: Iterable[int]) -> str:
        """Decode ``token_ids`` and return the text that is now final.

        After a stop string is found, ``stop_found`` is set, the returned text
        ends just before the stop string and later calls return "".
        """
        if self.stop_found is not None:
            return ""
        data = b"".join(self._token_bytes[token_id] for token_id in token_ids)
        self._pending += self._utf8.decode(data)
        return self._release()

    def flush(self) -> str:
        """Return the held-back text when the completion ends for another reason.

        Bytes of an unfinished UTF-8 character at the end are dropped.
        """
        if self.stop_found is not None:
            return ""
        text, self._pending = self._pending, ""
        self._utf8.reset()
        return text

    def _release(self) -> str:
        if not self._stop:
            text, self._pending = self._pending, ""
            return text

        match_start, match = self._find_first_stop()
        if match is not None:
            self.stop_found = match
            text, self._pending = self._pending[:match_start], ""
            return text

        num_held = self._num_chars_to_hold()
        cut = len(self._pending) - num_held
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text

    def _find_first_stop(self) -> tuple[int, str | None]:
        best_start, best_stop = len(self._pending), None
        for stop in self._stop:
            start = self._pending.find(stop)
            if start != -1 and start < best_start:
                best_start, best_stop = start, stop
        return best_start, best_stop

    def _num_chars_to_hold(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        longest = min(len(self._pending), self._max_stop_chars - 1)
        for length in range(longest, 0, -1):
            tail = self._pending[-length:]
            if any(stop.startswith(tail) for stop in self._stop):
                return length
        return 0
