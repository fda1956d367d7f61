"""The demo job: fine-tune the embedded MiniLM on a multilingual sentiment sample with EMA."""
