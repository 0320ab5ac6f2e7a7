"""Training data: bundled corpora, tokenizers, the token-file cache and resumable batches.
"""

from jq8.data.corpus import (  # noqa: F401
    CACHE_FORMAT,
    DATA_DIR,
    DEFAULT_TOKENIZER,
    EOT,
    LEE_BACKGROUND,
    SENTENCES,
    WIKI_SAMPLE,
    Batch,
    BPETokenizer,
    ByteTokenizer,
    TextTokenizer,
    TokenDataset,
    default_cache_dir,
    load_documents,
    load_sentence_groups,
    load_tokenizer,
    prepare,
    resolve_source,
    source_files,
    source_fingerprint,
    split_documents,
    split_text_documents,
    train_tokenizer,
)
