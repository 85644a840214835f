"""SpecFleet: distributed, lossless speculative decoding.

Every top-level folder of the repository is installed as a subpackage of this one
(``specfleet.router``, ``specfleet.drafters``, ...); see pyproject's ``package-dir``.
"""

__version__ = "0.1.0"
