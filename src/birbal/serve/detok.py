"""Token text for a stream of ids, such that the pieces join up to exactly the decoded text.

Decoding one id at a time loses SentencePiece's word-start spaces ("▁world" decodes to "world") and splits
multi-byte characters over byte-fallback tokens. This is the prefix/read-offset scheme TGI and vLLM use: decode
a short window before and after the new id, emit the difference, and hold back text that ends in a partial
character until the next id completes it.
"""

from __future__ import annotations

from functools import lru_cache

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix_offset:self._read_offset])
        after = self._decode(self.ids[self._prefix_offset:])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            piece = after[len(before):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Text still held back at the end (a character left partial by the last id)."""
        if self._read_offset == len(self.ids):
            return ""
        full = self._decode(self.ids[self._prefix_offset:])
        before = self._decode(self.ids[self._prefix_offset:self._read_offset])
        piece = full[len(before):]
        self._read_offset = len(self.ids)
        self.text += piece
        return piece


def surface_cache(tokenizer):
    """id -> the token's text as a key of `top_logprob`, with its word-start space kept (" Paris", not "Paris")."""

    @lru_cache(maxsize=65536)
    def surface(token_id: int) -> str:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        return text

    return surface
