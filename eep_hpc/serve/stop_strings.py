"""Stop strings over streamed text: find them across token boundaries, hold back what might start one.

Text arrives in pieces (one detokenized token at a time). `feed` returns the text that is safe to send: a stop
string is never split between text already sent and text still to come, because any tail of the pending text that
is a prefix of a stop string is held back until the next piece decides it. The emitted text is therefore the same
whether it is streamed or collected.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stop: list[str], include_stop_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include = include_stop_in_output
        self.matched: str | None = None  # the stop string that ended the text
        self._pending = ""

    def feed(self, text: str, check: bool = True) -> str:
        """Add `text`; return what may be emitted now. After a match (`self.matched` set) feed nothing more.

        check=False (before min_tokens) passes text through without looking for stop strings.
        """
        assert self.matched is None, "text fed after a stop string matched"
        pending = self._pending + text
        if not self.stop or not check:
            self._pending = ""
            return pending
        hit, hit_at = None, -1
        for s in self.stop:
            i = pending.find(s)
            if i != -1 and (hit_at == -1 or i < hit_at or (i == hit_at and len(s) < len(hit))):
                hit, hit_at = s, i
        if hit is not None:
            self.matched = hit
            self._pending = ""
            return pending[: hit_at + len(hit)] if self.include else pending[:hit_at]
        keep = self._held_back(pending)
        self._pending = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """The text is over (finished for another reason): release what was held back."""
        out, self._pending = self._pending, ""
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
