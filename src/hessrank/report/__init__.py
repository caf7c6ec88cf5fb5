"""Reports: the analysis, the advice and its validation as a page a user reads (``hessrank report DIR``).

Reads the documented files only and knows nothing of how their numbers were computed.
"""

from .page import find_sources, write_report

__all__ = ["find_sources", "write_report"]
