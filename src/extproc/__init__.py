"""llm-extproc: an Envoy external processor that routes and repairs OpenAI-compatible traffic."""

__version__ = "0.1.0"
