"""The emotion corpus: concept catalogue, built-in story generator, readers, prompts and the corpus build."""
