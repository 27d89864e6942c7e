"""The shard format: webdataset tars plus index.parquet and manifest.json. Knows nothing of curators."""
