"""
Idle entries kept as lines of bytes (L{twisted_mta.queue.idle}): what goes
in comes out the same, by queue id, by due minute or by a flush, and no
Python object is kept per entry.
"""

from __future__ import annotations

import math
import sys

from twisted.trial import unittest

from twisted_mta.queue.idle import RIPEN, WIDTH, IdleEntries, IdleEntry

T0 = 1_800_000_000.0  # a whole minute


class IdleEntriesTests(unittest.TestCase):
    def test_round_trip(self):
        """Each field of each state comes back as it went in, found by its queue id."""
        idle = IdleEntries()
        rows = [
            IdleEntry("A1", "new", T0 + 600.25, True),
            IdleEntry("B2", "cur", T0 + 86400.0, False),
            IdleEntry("C3", "hold", math.inf, False),
            IdleEntry("D4", "cur", T0 + 1 / 3, True),
        ]
        for row in rows:
            idle.add(*row)
        for row in rows:
            self.assertEqual(idle.find(row.queue_id), row)
        self.assertEqual(sorted(idle), sorted(rows))
        self.assertEqual((len(idle), idle.counts), (4, {"new": 1, "cur": 2, "hold": 1}))

    def test_a_prefix_is_not_a_match(self):
        """C{AB} is not found in C{ABC}'s line, nor C{BC}."""
        idle = IdleEntries()
        idle.add("ABC", "cur", T0 + 600)
        self.assertIsNone(idle.find("AB"))
        self.assertIsNone(idle.find("BC"))
        self.assertIsNone(idle.remove("AB"))
        self.assertEqual(len(idle), 1)

    def test_remove(self):
        """A removed entry is gone from its buffer; the others stay; an empty minute goes."""
        idle = IdleEntries()
        idle.add("A1", "cur", T0 + 600)
        idle.add("B2", "cur", T0 + 610)
        idle.add("C3", "cur", T0 + 7200)
        self.assertEqual(idle.remove("B2"), IdleEntry("B2", "cur", T0 + 610, False))
        self.assertIsNone(idle.find("B2"))
        self.assertEqual(idle.remove("A1").queue_id, "A1")
        self.assertEqual(idle.ripe_at(), T0 + 7200 - RIPEN)  # minute of A1 and B2: gone
        self.assertEqual([e.queue_id for e in idle], ["C3"])
        self.assertEqual(idle.counts["cur"], 1)

    def test_ripe_at(self):
        """A minute is handed over RIPEN before it starts; held entries never; a flush at once."""
        idle = IdleEntries()
        self.assertIsNone(idle.ripe_at())
        idle.add("H", "hold", math.inf)
        self.assertIsNone(idle.ripe_at())
        idle.add("L", "cur", T0 + 3 * WIDTH + 59)
        idle.add("E", "cur", T0 + 2 * WIDTH + 1)
        self.assertEqual(idle.ripe_at(), T0 + 2 * WIDTH - RIPEN)
        idle.flush(T0)
        self.assertEqual(idle.ripe_at(), -math.inf)

    def test_take_by_minute(self):
        """Nothing before the first minute is near; then its entries, in order, C{limit} at a time, then the next minute's."""
        idle = IdleEntries()
        for i in range(5):
            idle.add(f"E{i}", "cur", T0 + 600 + i)
        idle.add("N", "new", T0 + 660, recovering=True)
        ripe = T0 + 600 - RIPEN
        self.assertEqual(idle.take(ripe - 1, 10), [])
        first = idle.take(ripe, 3)
        self.assertEqual([(e.queue_id, e.due) for e in first],
                         [("E0", T0 + 600), ("E1", T0 + 601), ("E2", T0 + 602)])
        self.assertEqual([e.queue_id for e in idle.take(ripe, 10)], ["E3", "E4"])
        self.assertEqual(idle.take(ripe, 10), [])  # the next minute is not near yet
        self.assertEqual(idle.take(T0 + 660 - RIPEN, 10),
                         [IdleEntry("N", "new", T0 + 660, True)])
        self.assertEqual((len(idle), idle.ripe_at()), (0, None))

    def test_flush(self):
        """A flush makes every entry but the held due at its time (or earlier, if due before); a later add waits for its minute."""
        idle = IdleEntries()
        idle.add("A", "cur", T0 + 7200)
        idle.add("B", "new", T0 + 600)
        idle.add("H", "hold", math.inf)
        idle.flush(T0 + 5)
        idle.add("C", "cur", T0 + 9000)
        # one minute's buffer at a time, the earliest first
        self.assertEqual(idle.take(T0 + 5, 10), [IdleEntry("B", "new", T0 + 5, False)])
        self.assertEqual(idle.take(T0 + 5, 10), [IdleEntry("A", "cur", T0 + 5, False)])
        self.assertEqual(idle.find("H").state, "hold")
        self.assertEqual(idle.take(T0 + 5, 10), [])
        self.assertEqual(idle.ripe_at(), T0 + 9000 - RIPEN)
        self.assertEqual(idle.counts, {"new": 0, "cur": 1, "hold": 1})

    def test_a_flushed_entry_can_be_found_and_removed(self):
        idle = IdleEntries()
        idle.add("A", "cur", T0 + 7200)
        idle.add("B", "cur", T0 + 7200)
        idle.flush(T0)
        self.assertEqual(idle.find("B"), IdleEntry("B", "cur", T0, False))
        self.assertEqual(idle.remove("A").due, T0)
        self.assertEqual([e.queue_id for e in idle.take(T0, 10)], ["B"])
        self.assertIsNone(idle.ripe_at())

    def test_no_object_per_entry(self):
        """Ten thousand idle entries add a few hundred memory blocks at most (each line lives in a buffer), and about 40 bytes each."""
        idle = IdleEntries()
        idle.add("WARM", "cur", T0)
        blocks = sys.getallocatedblocks()
        for i in range(10_000):
            idle.add(f"6B14BCA8CBCDE{i:05d}", "cur", T0 + 600 + i * 0.5)
        grown = sys.getallocatedblocks() - blocks
        self.assertLess(grown, 500)
        size = sum(len(lines) for lines, _ in idle._buffers())
        self.assertLess(size / 10_000, 50)
        self.assertEqual(idle.remove("WARM").queue_id, "WARM")
        taken = []
        while len(idle):
            taken.extend(e.queue_id for e in idle.take(T0 + 99_999, 500))
        self.assertEqual(len(set(taken)), len(taken))
        self.assertEqual(sorted(taken), [f"6B14BCA8CBCDE{i:05d}" for i in range(10_000)])
        self.assertEqual(idle._buckets, {})
