"""``python -m jq8.data``: retrain the bundled tokenizer, or tokenize a source into the cache."""

from jq8.data.corpus import _main

if __name__ == "__main__":
    _main()
