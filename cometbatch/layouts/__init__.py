"""Dataset layouts: images packed from staging into webdataset or parquet shards."""
