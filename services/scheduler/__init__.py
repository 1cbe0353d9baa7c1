"""The scheduler service: the fleet view from ``state.*``, the routing policies, ``route`` -> ``submit``.

It may import shared/ only, and never its own sim/ (offline tools). No other service imports it;
launcher/, bench/ and tests/ may import its policies and sim/."""
