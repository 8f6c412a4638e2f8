"""magnesium-cds: a CDS Hooks 2.0 service for magnesium safety."""

from cds_service import native

__version__ = "0.1.0"

# Before any compiled module is imported: an extension older than its source must not run.
native.install()
