"""Argument types the benchmark scripts share: comma-separated lists, positive numbers, a device that exists."""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from segformer_fast.core.runtime import resolve_device


def split_list(values) -> list:
    """Items of a string or list of strings, split at commas: ["b0,b2", "b5"] -> ["b0", "b2", "b5"]."""
    out = []
    for value in values if isinstance(values, (list, tuple)) else [values]:
        out.extend(part.strip() for part in str(value).split(",") if part.strip())
    return out


def list_argument(kind: str, valid: Callable[[], list], normalize=str.lower):
    """An argparse type for a comma-separated list of names from ``valid()``; the error names the valid ones."""

    def parse(text: str) -> list:
        items = [normalize(item) for item in split_list(text)]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list; valid: {', '.join(valid())}")
        for item in items:
            if item not in valid():
                raise argparse.ArgumentTypeError(f"unknown {kind} {item!r}; valid: {', '.join(valid())}")
        return items

    parse.__name__ = kind
    return parse


def flatten(groups) -> list | None:
    """The items of ``nargs="+"`` list arguments in order, without repeats (None stays None)."""
    if groups is None:
        return None
    out = []
    for group in groups:
        for item in group if isinstance(group, list) else [group]:
            if item not in out:
                out.append(item)
    return out


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def device_argument(text: str) -> torch.device:
    """An argparse type: "auto", "cpu", "cuda" or "cuda:N" as a checked device (segformer_fast.core.runtime's rules)."""
    try:
        return resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


__all__ = ["split_list", "list_argument", "flatten", "positive_int", "positive_float", "device_argument"]
