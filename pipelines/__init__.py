"""Data jobs: ingest raw click logs, encode them to Parquet, stream batches."""
