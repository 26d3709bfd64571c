"""Data: the tokenizer, the pretraining corpus, instruction records, prompt templates, the collator."""
