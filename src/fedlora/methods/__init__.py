"""Federated methods, one file each, registered by name."""

from fedlora.methods.registry import available_methods, get_method, method_class, register

__all__ = ["available_methods", "get_method", "method_class", "register"]
