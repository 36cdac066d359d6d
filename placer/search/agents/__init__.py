"""Learning agents that search placements: hierarchical (grouper + seq2seq placer, PPO),
REINFORCE, flat and sequential.  Entry point: :func:`placer.search.search.search`."""

from placer.search.tracker import SearchProgress, SearchResult

__all__ = ["SearchProgress", "SearchResult", "search"]


def __getattr__(name: str):
    # search imports SB3 and torch: load it only when asked for.
    if name == "search":
        from placer.search.search import search

        return search
    raise AttributeError(name)
