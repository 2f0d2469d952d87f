"""On-disk formats: artifact writing, the manifest, and registered tensor formats."""
