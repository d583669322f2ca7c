"""IDZoom: ingest with quarantine, zoomed face crops, skeleton/landmark condition maps, Parquet manifests,
the sample-set builder and Great Expectations validation (DESIGN.md §2)."""
