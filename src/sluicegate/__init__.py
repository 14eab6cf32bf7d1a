"""sluicegate: a self-hosted gateway for Azure OpenAI."""

__version__ = "0.1.0"
