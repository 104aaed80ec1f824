"""activecall.backlink: links strong while a call runs, weak once it has ended (with the collector off, so
only reference counting frees anything)."""

import gc
import weakref

from twisted.trial import unittest

from activecall.backlink import BackLink, LinkedCall, WeakMethod, back_link


class Owner:
    def __init__(self):
        self.back_link = BackLink(self)
        self.part = Part(self)
        self.heard = []

    def hear(self, value):
        self.heard.append(value)
        return value


class Part:
    owner = back_link()

    def __init__(self, owner):
        self.owner = owner
        self.tell = LinkedCall(owner.back_link, "hear")


class BackLinkTests(unittest.TestCase):
    def setUp(self):
        gc.disable()
        self.addCleanup(gc.enable)

    def test_strong_until_weakened_then_freed_by_reference_counting(self):
        owner = Owner()
        part, ref = owner.part, weakref.ref(owner)
        self.assertIs(part.owner, owner)
        self.assertEqual(part.tell(1), 1)
        owner.back_link.weaken()
        self.assertIs(part.owner, owner)  # still readable while someone holds the owner
        self.assertEqual(part.tell(2), 2)
        self.assertEqual(owner.heard, [1, 2])
        del owner
        self.assertIsNone(ref())
        self.assertIsNone(part.owner)
        self.assertIsNone(part.tell(3))  # does nothing once the owner is gone

    def test_not_weakened_the_owner_stays_in_its_cycle(self):
        owner = Owner()
        ref = weakref.ref(owner)
        del owner
        self.assertIsNotNone(ref())  # what the session's links did before the end of every call
        gc.collect()
        self.assertIsNone(ref())

    def test_an_owner_without_a_link_is_held_as_before(self):
        class Plain:
            pass

        plain = Plain()
        part = Part.__new__(Part)
        part.owner = plain
        ref = weakref.ref(plain)
        del plain
        self.assertIsNotNone(ref())
        self.assertIs(part.owner, ref())
        part.owner = None
        self.assertIsNone(part.owner)
        self.assertIsNone(ref())

    def test_weak_method_is_equal_to_its_bound_method_and_does_not_hold_the_object(self):
        owner = Owner()
        method = WeakMethod(owner.hear)
        listeners = [method]
        self.assertEqual(method(5), 5)
        self.assertIn(owner.hear, listeners)
        listeners.remove(owner.hear)
        self.assertEqual(listeners, [])
        self.assertNotEqual(method, Owner().hear)
        self.assertEqual(method, WeakMethod(owner.hear))
        owner.back_link.weaken()
        ref = weakref.ref(owner)
        del owner
        self.assertIsNone(ref())
        self.assertIsNone(method(6))
