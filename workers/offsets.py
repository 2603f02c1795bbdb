"""Which offsets may be committed while many jobs of one partition are in flight and finish out of order.

Kafka commits a position, not a set: committing offset N says every record below N is done. With jobs finishing
out of order, the position of a partition is its lowest offset still in flight, or one past the highest offset
started when nothing is in flight. Books only, no I/O: the worker commits what `commit_points` returns.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from schemas.errors import VlmflowError

P = TypeVar("P", bound=Hashable)
"""A partition: aiokafka's `TopicPartition` in the worker, anything hashable in tests."""


class OffsetOrderError(VlmflowError):
    """An offset started twice or out of order, or finished twice: a defect of the caller."""


@dataclass(frozen=True)
class Ticket(Generic[P]):
    """One record taken for work; hand it back to `done`."""

    partition: P
    offset: int
    generation: int
    """The partition's assignment when the record was taken; a later rebalance makes the ticket stale."""


@dataclass
class _PartitionBooks:
    generation: int
    next_offset: int
    """One past the highest offset started."""
    in_flight: set[int] = field(default_factory=set)
    """Offsets started and not done."""
    committed: int = 0
    """The position last committed; at first the offset the assignment started from."""

    def position(self) -> int:
        return min(self.in_flight) if self.in_flight else self.next_offset


class OffsetTracker(Generic[P]):
    """Per partition: offsets in flight, and the commit position that no unfinished record lies below."""

    def __init__(self) -> None:
        self._books: dict[P, _PartitionBooks] = {}  # partition -> its books while assigned
        self._generations = 0  # assignments seen, so tickets of a forgotten assignment are told apart

    def start(self, partition: P, offset: int) -> Ticket[P]:
        """A record was taken for work. Offsets of one partition must arrive in increasing order."""
        books = self._books.get(partition)
        if books is None:
            self._generations += 1
            books = _PartitionBooks(generation=self._generations, next_offset=offset, committed=offset)
            self._books[partition] = books
        if offset < books.next_offset:
            raise OffsetOrderError(f"{partition}: offset {offset} started after {books.next_offset - 1}")
        books.in_flight.add(offset)
        books.next_offset = offset + 1
        return Ticket(partition, offset, books.generation)

    def done(self, ticket: Ticket[P]) -> bool:
        """The record's job is fully handled. False when its partition was forgotten since it was taken: the
        new owner has the record again and this position is not ours to move."""
        books = self._books.get(ticket.partition)
        if books is None or books.generation != ticket.generation:
            return False
        if ticket.offset not in books.in_flight:
            raise OffsetOrderError(f"{ticket.partition}: offset {ticket.offset} finished twice")
        books.in_flight.remove(ticket.offset)
        return True

    def in_flight(self) -> int:
        """Records taken and not done, over all partitions still assigned."""
        return sum(len(books.in_flight) for books in self._books.values())

    def commit_points(self, partitions: Iterable[P] | None = None) -> dict[P, int]:
        """Positions that moved since the last commit (of `partitions`, or of all): what to commit now."""
        wanted = self._books.keys() if partitions is None else [p for p in partitions if p in self._books]
        points = {}
        for partition in wanted:
            books = self._books[partition]
            position = books.position()
            if books.committed < position:
                points[partition] = position
        return points

    def committed(self, points: dict[P, int]) -> None:
        """The broker accepted these positions (call only after the commit succeeded)."""
        for partition, position in points.items():
            books = self._books.get(partition)
            if books is not None:
                books.committed = max(books.committed, position)

    def position(self, partition: P) -> int | None:
        """The lowest offset of `partition` not fully handled yet (None when nothing was taken from it)."""
        books = self._books.get(partition)
        return None if books is None else books.position()

    def forget(self, partitions: Iterable[P]) -> None:
        """Partitions taken away by a rebalance: their records in flight will be redelivered to the new owner."""
        for partition in partitions:
            self._books.pop(partition, None)
