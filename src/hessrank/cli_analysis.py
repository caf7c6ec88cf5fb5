"""CLI subcommands for the analysis pipeline (registered by :mod:`hessrank.cli`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the pipeline subcommands to the ``hessrank`` parser."""
