"""The LLM annotator: tag schema, versioned prompt, tolerant parser, OpenAI-compatible client and cache."""
