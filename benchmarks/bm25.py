"""BM25 retrieval over a list of texts (``bm25s``), shared by the LoCoMo tools and the synthetic benchmark."""

from __future__ import annotations

from collections.abc import Sequence

from .extras import import_optional


class BM25Retriever:
    """A ``bm25s`` index over ``texts``; :meth:`retrieve` returns the best-scoring positions for a query.

    ``stopwords`` is passed to ``bm25s.tokenize``. The default, bm25s's longer English list ("en_plus"), also drops
    question words (what, when, did, ...) that otherwise pull short unrelated texts to the top; on LoCoMo it
    raises evidence recall@10 over categories 1-4 from 0.56 ("en") to 0.62.
    """

    def __init__(self, texts: Sequence[str], stopwords: str | list[str] = "en_plus", what: str = "texts"):
        self._bm25s = import_optional("bm25s")
        self.stopwords = stopwords
        self.size = len(texts)
        if not self.size:
            raise ValueError(f"cannot build a BM25 index over zero {what}")
        self._index = self._bm25s.BM25()
        self._index.index(
            self._bm25s.tokenize(list(texts), stopwords=stopwords, show_progress=False), show_progress=False
        )

    def retrieve(self, query: str, k: int) -> list[int]:
        """Indices (into the texts) of the top-``k`` texts with a positive score, best first."""
        if k <= 0:
            return []
        tokens = self._bm25s.tokenize([query], stopwords=self.stopwords, show_progress=False, return_ids=False)
        if not tokens[0]:
            return []
        docs, scores = self._index.retrieve(tokens, k=min(k, self.size), show_progress=False)
        return [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]
