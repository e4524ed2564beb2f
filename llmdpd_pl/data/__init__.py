"""Data: task prompts, offline dataset collection (Minari), the LLM embedding cache, the datamodule."""
