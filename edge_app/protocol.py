"""Scan protocols (ordered lists of target views) and where to put the probe for each view."""
from __future__ import annotations

from typing import Iterable

from devices.labels import VIEWS

# Built-in protocols by name. "focused": the focused cardiac ultrasound sequence of most POCUS
# courses, parasternal first, then apical, then subcostal (one window after the other).
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "focused": ("PLAX", "PSAX", "A4C", "A2C", "SC4C"),
    "apical": ("A4C", "A2C"),
    "parasternal": ("PLAX", "PSAX"),
}

# Where to start looking for each view (shown while no standard view is recognised near the target).
WINDOW_HINT: dict[str, str] = {
    "PLAX": "place the probe left of the sternum, 3rd-4th rib space, marker to the right shoulder",
    "PSAX": "place the probe left of the sternum, 3rd-4th rib space, marker to the left shoulder",
    "A4C": "place the probe on the apex beat, below the left nipple, marker to the patient's left",
    "A2C": "place the probe on the apex beat, below the left nipple, marker toward the head",
    "SC4C": "place the probe flat below the breastbone, aiming at the left shoulder",
}


def resolve_protocol(protocol: str | Iterable[str], views: Iterable[str] = VIEWS) -> tuple[str, ...]:
    """A protocol name or a list of view names -> validated tuple of view names.

    Args:
        protocol: a name from PROTOCOLS, a comma-separated string of views ("A4C,A2C"), or view names.
        views: the views the model knows.

    Returns:
        Upper-case view names in order.

    Raises:
        ValueError: unknown protocol name or view, or an empty protocol.
    """
    views = tuple(views)
    if isinstance(protocol, str):
        key = protocol.strip().lower()
        if key in PROTOCOLS:
            names: Iterable[str] = PROTOCOLS[key]
        elif "," in protocol or protocol.strip().upper() in views:
            names = [p for p in protocol.split(",") if p.strip()]
        else:
            raise ValueError(f"unknown protocol '{protocol}': choose one of {', '.join(PROTOCOLS)} "
                             f"or list views separated by commas (e.g. A4C,A2C)")
    else:
        names = protocol
    out = tuple(resolve_view(n, views) for n in names)
    if not out:
        raise ValueError("a protocol needs at least one view")
    return out


def resolve_view(name: str, views: Iterable[str] = VIEWS) -> str:
    """Validated upper-case target view name; raises ValueError naming the valid ones."""
    views = tuple(views)
    key = str(name).strip().upper()
    if key not in views:
        raise ValueError(f"unknown target view '{name}': choose one of {', '.join(views)}")
    return key
