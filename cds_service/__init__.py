"""magnesium-cds: a CDS Hooks 2.0 service for magnesium safety."""

__version__ = "0.1.0"
