"""Holistic CLIP training: model, loss, tokenizer and the training program."""
