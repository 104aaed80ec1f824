"""Links from a call's parts back to their call: strong while the call runs, weak once it has ended.

A call's session owns its leg, playback, playbook runner, speech processors, ...; each of those also
points back at the session (``leg.session``, the playback's ``emit``, the VAD's callbacks).  Those
two-way links are reference cycles: a finished call was freed only by the cyclic garbage collector
(about 190 objects a call, kept until the next collection, which also costs CPU on the call path).

Each owner has one ``BackLink``; its parts hold the link (through the ``back_link`` descriptor, or a
``LinkedCall`` in place of a bound method, or the link itself in a closure) instead of the owner.
``BackLink.weaken()`` at the end of the call turns every one of them weak at once: whoever still
holds the owner (the API, a test, the CDR code) reads the same links as before, and when nothing
does any more, reference counting frees the call.  A part reached after its owner is gone sees
``None`` (attributes) or does nothing (callables).

Neutral module (no call/, sip/, media/ imports) so every layer may use it.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional


class BackLink:
    """The link to ``target``: ``link()`` is the target (None once it is gone after ``weaken()``)."""

    __slots__ = ("_strong", "_weak")

    def __init__(self, target: Any):
        self._strong = target
        self._weak: Optional[weakref.ref] = None

    def __call__(self) -> Any:
        target = self._strong
        if target is None and self._weak is not None:
            return self._weak()
        return target

    def weaken(self) -> None:
        """From now on the link does not keep its target alive (idempotent)."""
        target = self._strong
        if target is not None:
            self._weak = weakref.ref(target)
            self._strong = None


def link_to(target: Any) -> BackLink:
    """``target``'s own link (its ``back_link`` attribute) when it has one, else a strong one of its own
    (a test's fake session, say): then nothing changes for it."""
    link = getattr(target, "back_link", None)
    return link if isinstance(link, BackLink) else BackLink(target)


class back_link:
    """Descriptor: an attribute holding its owner through the owner's ``BackLink``.

    ``part.session = session`` stores ``link_to(session)``; ``part.session`` reads the session (None
    when it was freed after the end).  Assigning None clears it."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name + "_link"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        link = obj.__dict__.get(self.slot)
        return link() if link is not None else None

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = None if value is None else link_to(value)


class LinkedCall:
    """``getattr(link(), name)(...)`` — a bound method of the link's target without holding it; a call
    after the target is gone does nothing (returns None)."""

    __slots__ = ("link", "name")

    def __init__(self, link: BackLink, name: str):
        self.link = link
        self.name = name

    def __call__(self, *args, **kwargs):
        target = self.link()
        if target is None:
            return None
        return getattr(target, self.name)(*args, **kwargs)


class WeakMethod:
    """A bound method that does not keep its object alive: for a callback handed to something the
    object itself owns (its VAD, its SIP dialog), which would otherwise be a reference cycle.  Once
    the object is gone, a call does nothing (returns None).  Equal to the bound method it wraps, so
    ``remove_listener(obj.method)`` still finds it.  (``weakref.WeakMethod`` is several times dearer to
    make: a few are made per call.)"""

    __slots__ = ("_obj", "_func", "__weakref__")

    def __init__(self, method):
        self._obj = weakref.ref(method.__self__)
        self._func = method.__func__

    def __call__(self, *args, **kwargs):
        obj = self._obj()
        if obj is None:
            return None
        return self._func(obj, *args, **kwargs)

    def __eq__(self, other):
        obj = self._obj()
        if isinstance(other, WeakMethod):
            return obj is not None and obj is other._obj() and self._func is other._func
        return (obj is not None and getattr(other, "__self__", None) is obj
                and getattr(other, "__func__", None) is self._func)

    def __hash__(self):
        return hash(self._func)
