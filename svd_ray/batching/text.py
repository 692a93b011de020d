"""Incremental detokenisation with stop strings, per generated sequence.

The text of a sequence is always ``decode(all its tokens)`` (never the concatenation of per-token
pieces, which breaks multi-byte characters and merges). A piece is released to the client only when it
can no longer change: a trailing U+FFFD (an incomplete UTF-8 sequence) and the last ``len(stop) − 1``
characters (a stop string may be starting) are held back. When a stop string appears, the text ends just
before it and the sequence stops.
"""
from __future__ import annotations

from typing import Callable


class TextTracker:
    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...] = ()):
        self.decode = decode
        self.stops = tuple(s for s in stop_strings if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""  # text already released

    def _text(self) -> tuple[str, bool]:
        text = self.decode(self.ids)
        cuts = [c for c in (text.find(s) for s in self.stops) if c >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; returns (newly releasable text, stopped)."""
        self.ids.append(token_id)
        text, stopped = self._text()
        if stopped:
            return self._release(text), True
        safe = text.rstrip("\ufffd")
        if self.hold:
            safe = safe[: max(len(self.sent), len(safe) - self.hold)]
        return self._release(safe), False

    def _release(self, text: str) -> str:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            piece = text[len(self.sent):]
            self.sent = text
            return piece
        return ""

    def finish(self) -> tuple[str, str]:
        """(the rest of the text not yet released, the whole final text) at the end of the sequence."""
        text, _ = self._text()
        return self._release(text), text
