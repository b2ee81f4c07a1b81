"""The streaming manifest reader every stage uses: rows and their checks, the scan into chunks,
chunk readers, ids unique across a manifest, and results written in published parts."""
