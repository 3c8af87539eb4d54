"""ReasonEdit: reasoning-enhanced image editing (think -> edit -> reflect)."""

__version__ = "0.1.0"
