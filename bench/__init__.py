"""Performance benchmarks (`make bench`): one module per area, each printing one JSON object per benchmark."""
