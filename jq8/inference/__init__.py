"""Running models: KV-cache generation (``decode``), jitted calls on large parameter trees (``dispatch``),
perplexity evaluation (``evaluate``)."""
