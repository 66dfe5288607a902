"""recsift: keep an LLM recommender fresh from a live interaction stream with a small, continuously
maintained coreset (DEALRec influence + effort scores, coverage-enhanced stratified selection, GORACS)."""

__version__ = "0.1.0"
