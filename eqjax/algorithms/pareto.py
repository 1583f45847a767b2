"""Pareto frontier of (energy, accuracy) points: lower energy and higher accuracy are better."""

from __future__ import annotations

from typing import Sequence


def pareto_front(energies: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, sorted by increasing energy.

    A point is dominated when another has energy <= and accuracy >= with one strict.
    Duplicates of a frontier point are all kept.
    """
    if len(energies) != len(accuracies):
        raise ValueError(f"got {len(energies)} energies but {len(accuracies)} accuracies")
    order = sorted(range(len(energies)), key=lambda i: (energies[i], -accuracies[i]))
    front, best = [], float("-inf")
    for i in order:
        dominated = any(energies[j] <= energies[i] and accuracies[j] >= accuracies[i]
                        and (energies[j] < energies[i] or accuracies[j] > accuracies[i])
                        for j in front)
        if not dominated and accuracies[i] >= best:
            front.append(i)
            best = accuracies[i]
    return front
