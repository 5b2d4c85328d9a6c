"""The filter chain: `Call`, the filter contract and phases, composition per service, and the
helpers filters use (metadata, outcomes)."""

from gmesh.chain.call import Call, Caller, Door
from gmesh.chain.compose import PluginFactory, ServiceChain, build_chain, compose
from gmesh.chain.filter import BuildContext, Filter, FilterFactory, Handler, Phase
from gmesh.chain.metadata import Metadata, metadata_value, metadata_values
from gmesh.errors import CallError, Outcome, outcome_of

__all__ = [
    "BuildContext",
    "Call",
    "CallError",
    "Caller",
    "Door",
    "Filter",
    "FilterFactory",
    "Handler",
    "Metadata",
    "Outcome",
    "Phase",
    "PluginFactory",
    "ServiceChain",
    "build_chain",
    "compose",
    "metadata_value",
    "metadata_values",
    "outcome_of",
]
