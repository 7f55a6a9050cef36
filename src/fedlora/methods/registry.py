"""Methods registered by name; the CLI's choices come from here."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlora.config import MethodConfig
    from fedlora.methods.base import Method

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(config: "MethodConfig") -> "Method":
    _load_builtin()
    return _REGISTRY[config.name](config)


def method_class(name: str) -> type["Method"]:
    _load_builtin()
    return _REGISTRY[name]


def _load_builtin() -> None:
    # Importing a method module registers it; one import line per method file.
    from fedlora.methods import ffa, lora  # noqa: F401
    from fedlora.methods import fair, fedex, fedsa, fedsvd, flexlora, flora, full, galore, head  # noqa: F401
    from fedlora.methods import hetlora, mole  # noqa: F401
    from fedlora.methods import reslora, rolora  # noqa: F401
    from fedlora.methods import xgblora  # noqa: F401
