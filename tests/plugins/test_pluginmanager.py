"""Loading plugins: built-ins through the entry-point group, third parties first, essentials kept."""

from __future__ import annotations

import pytest
from pydantic import Field

from gmesh import hookimpl
from gmesh.config.kinds import Kind, KindRegistry
from gmesh.config.types import SpecModel
from gmesh.errors import InvalidArgument
from gmesh.pluginmanager import Plugins


class LocalServiceSpec(SpecModel):
    owner: str = Field(description="replaces the built-in Service spec")


class OverridingPlugin:
    @hookimpl
    def gmesh_register_config_kinds(self, kinds: KindRegistry) -> None:
        kinds.add(Kind("Service", LocalServiceSpec, "a third party's Service"))


def test_builtins_load_through_the_entry_point_group() -> None:
    plugins = Plugins.load()
    service = next(i for i in plugins.describe() if i.name == "service")
    assert (service.distribution, service.builtin) == ("gmesh", True)
    assert service.hooks == ("gmesh_register_config_kinds",)
    kinds = plugins.config_kinds()
    assert kinds.require("svc").name == "Service" and kinds.require("Service").plugin == "service"


def test_a_third_party_can_replace_a_builtin_kind() -> None:
    plugins = Plugins.load(entry_points=False, disabled=frozenset())
    plugins.pm.register(OverridingPlugin(), name="local-service")
    kinds = plugins.config_kinds()
    assert kinds.require("Service").spec is LocalServiceSpec
    assert kinds.require("Service").plugin == "local-service"


def test_disabled_plugins_are_not_loaded_but_essentials_cannot_be_disabled() -> None:
    plugins = Plugins.load(disabled=frozenset({"owners"}))
    assert plugins.pm.get_plugin("owners") is None
    assert plugins.config_kinds().get("Owner") is None
    with pytest.raises(InvalidArgument, match="service cannot be disabled"):
        Plugins.load(disabled=frozenset({"service"}))
