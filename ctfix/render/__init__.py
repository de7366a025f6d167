"""Output: text, markdown, JSON, Prometheus. Values in, strings out; no I/O here
beyond writing to the stream a caller passes."""
