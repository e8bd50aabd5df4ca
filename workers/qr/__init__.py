"""Query/retrieve over the instance index: C-FIND, C-GET and C-MOVE SCP."""

from .service import QUERY_MODELS, QueryRetrieve

__all__ = ["QUERY_MODELS", "QueryRetrieve"]
