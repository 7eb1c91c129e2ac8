"""SafeConf: calibrated LLM safety self-evaluation on Ray."""

__version__ = "0.1.0"
