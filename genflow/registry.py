"""Registries by declaration: a class that sets ``name`` is registered (solvers, SDE solvers),
and a name that is not registered gets an error listing the closest ones."""
from genflow._checks import did_you_mean

__all__ = ["lookup", "named_subclasses"]


def named_subclasses(base: type, what: str) -> dict:
    """``{cls.name: cls}`` for every subclass of ``base`` (at any depth) that sets a non-empty
    ``name``, sorted by name; two classes with one name raise (``what`` names the kind)."""
    found, stack = {}, list(base.__subclasses__())
    while stack:
        cls = stack.pop(0)
        stack.extend(cls.__subclasses__())
        if cls.name:
            if cls.name in found and found[cls.name] is not cls:
                raise RuntimeError(f"two {what}s are named {cls.name!r}: {found[cls.name]} and {cls}")
            found[cls.name] = cls
    return dict(sorted(found.items()))


def lookup(registry: dict, name, argument: str = "solver", context: str = ""):
    """``registry[name]``; a non-string or unknown ``name`` raises naming ``argument`` (and
    ``context``, e.g. " for a gf.SDE") with the closest registered names."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a name (str) from {sorted(registry)}, got {type(name).__name__}")
    if name not in registry:
        hint = did_you_mean(name, list(registry), n=3)
        raise ValueError(f"{argument} must be one of {sorted(registry)}{context}, got {name!r}{hint}")
    return registry[name]
