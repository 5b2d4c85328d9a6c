"""The filter chain: `Call`, the filter contract and phases, and composition per service."""

from gmesh.chain.call import Call, Caller
from gmesh.chain.compose import ChainTable, ServiceChain, build_table, compose
from gmesh.chain.filter import Filter, FilterFactory, Handler, Phase

__all__ = [
    "Call",
    "Caller",
    "ChainTable",
    "Filter",
    "FilterFactory",
    "Handler",
    "Phase",
    "ServiceChain",
    "build_table",
    "compose",
]
